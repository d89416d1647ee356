"""One side of `eval fid`: its statistics, how they were computed (compared between the two sides),
the precision/recall subset of its vectors, and saved statistics (`--save-stats`) read and written."""

from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..pipeline.errors import FlatDinoError
from ..pipeline.frechet import RunningStats

log = logging.getLogger(__name__)

IDENTITY_FIELDS = ("space", "network", "weights_sha256", "crop", "input_size", "antialias")


@dataclass
class SetStats:
    """One side of a comparison: its statistics, how they were computed, and what was read."""

    path: str
    mu: np.ndarray
    sigma: np.ndarray
    identity: dict  # IDENTITY_FIELDS; a field of None is unknown (not compared)
    count: int | None = None  # vectors in the statistics (None: saved statistics)
    failed: int = 0  # unreadable images skipped
    vectors: np.ndarray | None = None  # the precision/recall subset (float32), when asked

    @property
    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mu, self.sigma


def _pr_subset(n: int, cap: int) -> np.ndarray:
    """The seeded subset of positions 0..n-1 whose vectors precision/recall keeps."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, cap, replace=False))


class Accumulator:
    """Running statistics plus the precision/recall subset of a stream of vector batches."""

    def __init__(self, total: int, keep: int | None):
        self.stats: RunningStats | None = None
        self.position, self.kept = 0, []
        self.keep = None if keep is None else _pr_subset(total, keep)

    def add(self, x: np.ndarray) -> None:
        if self.stats is None:
            self.stats = RunningStats(x.shape[1])
        self.stats.add(x)
        if self.keep is not None:
            lo, hi = np.searchsorted(self.keep, [self.position, self.position + len(x)])
            self.kept.append(x[self.keep[lo:hi] - self.position].astype(np.float32))
        self.position += len(x)

    def result(self, path: str, identity: dict, failed: int = 0) -> SetStats:
        if self.stats is None or self.stats.n < 2:
            n = 0 if self.stats is None else self.stats.n
            raise FlatDinoError(
                f"{path!r} holds {n} readable sample(s); a Fréchet distance needs at least 2"
            )
        mu, sigma = self.stats.result()
        vectors = np.concatenate(self.kept) if self.keep is not None else None
        return SetStats(path, mu, sigma, identity, self.stats.n, failed, vectors)


def npz_members(p: Path) -> set[str]:
    try:
        with zipfile.ZipFile(p) as z:
            return set(z.namelist())
    except (OSError, zipfile.BadZipFile) as e:
        raise FlatDinoError(f"{str(p)!r} is not a readable .npz ({e})") from e


def is_saved_stats(path: str) -> bool:
    p = Path(path)
    return p.suffix == ".npz" and p.is_file() and "mu.npy" in npz_members(p)


def read_saved_stats(p: Path) -> SetStats:
    with np.load(p, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        mu, sigma = z["mu"], z["sigma"]
    if not meta:
        log.warning(
            "%s: saved statistics without a record of how they were computed; "
            "comparing them unchecked",
            p,
        )
    identity = {k: meta.get("identity", {}).get(k) for k in IDENTITY_FIELDS}
    return SetStats(str(p), mu, sigma, identity, meta.get("count"))


def save_stats(s: SetStats, path: str) -> None:
    """mu, sigma and a JSON record of how they were computed (read back by `load_set`)."""
    meta = {"identity": s.identity, "count": s.count, "source": s.path}
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:  # a file handle: np.savez would add .npz to a name
        np.savez(f, mu=s.mu, sigma=s.sigma, meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)


def check_comparable(a: SetStats, b: SetStats) -> None:
    """Refuse two sides whose known identities differ, naming the first field that does."""
    for name in IDENTITY_FIELDS:
        x, y = a.identity.get(name), b.identity.get(name)
        if x is not None and y is not None and x != y:
            show = (lambda v: str(v)[:12]) if name == "weights_sha256" else str
            raise FlatDinoError(
                f"the two sets were computed differently: {name} {show(x)} for {a.path!r} but "
                f"{show(y)} for {b.path!r}; compute both with the same --space, --backbone, "
                "--weights and --inception-weights (or recompute the saved statistics)"
            )
