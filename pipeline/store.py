"""What every flatdino Zarr store shares: shards, done markers, its kind, and its life cycle.

A store is a Zarr v3 group whose attrs carry `kind` (which store class reads it), a `fingerprint`
(what must match for a job to resume it), `shard_size` and `complete`. Its rows are split into
shards of `shard_size` consecutive rows (the unit of work of a job, a whole number of chunks of
every array, so no two workers ever write the same chunk file); `done[s]` is set only after shard
s is fully written, and resume reads it.

`open_or_create` is the one implementation of a job's start: resume a matching store, refuse a
mismatch, replace it with --overwrite (only a store of our kind, never anything else), or build a
new one beside its final path and rename it into place, so a crash never leaves a half-initialised
store. The store classes (`FeatureStore`, `LatentStore`) add their arrays and their writes.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import zarr

from .errors import FlatDinoError, StoreMismatchError


@dataclass(frozen=True)
class Shard:
    """One unit of work: rows [start, stop) of the store."""

    index: int
    start: int
    stop: int


def shard_bounds(num_images: int, shard_size: int) -> list[Shard]:
    """Split [0, num_images) into consecutive shards of `shard_size` (the last may be shorter)."""
    return [
        Shard(s, start, min(start + shard_size, num_images))
        for s, start in enumerate(range(0, num_images, shard_size))
    ]


def write_atomic(path: Path, data: bytes) -> None:
    """Write beside `path`, then rename into place: a kill never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check_finite(values: np.ndarray, shard: Shard, what: str, fix: str) -> None:
    """Refuse to write a shard holding NaN or inf (the shard stays not-done): name its rows."""
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        rows = (np.flatnonzero(bad) + shard.start).tolist()
        shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
        raise FlatDinoError(
            f"{what} are not finite (NaN or inf) for {len(rows)} row(s) of shard {shard.index} "
            f"(rows {shown}); the shard was not written; {fix}"
        )


def row_block(array: zarr.Array) -> int:
    """Rows of the array's storage objects: its shard (sharded stores) or its chunk: the unit a
    reader should read whole."""
    return int((array.shards or array.chunks)[0])


def store_kind(path: str | Path) -> str | None:
    """The `kind` attr of a flatdino Zarr store (feature or latents store); None if not a store."""
    if not (Path(path) / "zarr.json").exists():
        return None
    return zarr.open_group(str(path), mode="r").attrs.get("kind")


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


S = TypeVar("S", bound="ShardedStore")


class ShardedStore:
    """Read and write access to one store directory of kind `KIND`; subclasses name their arrays."""

    KIND = ""  # the `kind` attr this class reads
    NAME = ""  # in messages: "flatdino feature store"
    MAKER = ""  # the command that writes it: "extract-features"
    ROWS = ""  # the (N, ...) array whose first axis counts the rows
    FORMAT_VERSION = 1  # the layout this code writes
    ARRAYS: tuple[str, ...] = ()  # arrays listed by `summary`, when present

    def __init__(self, path: str | Path, mode: str = "r"):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise FlatDinoError(f"{str(self.path)!r} is not a Zarr store (no zarr.json)")
        self.group = zarr.open_group(str(self.path), mode=mode)
        self.attrs = dict(self.group.attrs)
        if self.attrs.get("kind") != self.KIND:
            raise FlatDinoError(
                f"{str(self.path)!r} is not a {self.NAME} (kind={self.attrs.get('kind')!r})"
            )
        self.shard_size = int(self.attrs["shard_size"])

    @classmethod
    def open_complete(cls: type[S], path: str, option: str) -> S:
        """A complete store for `option`, or a one-line error that says what to run."""
        kind = store_kind(path)
        if kind != cls.KIND:
            found = "no Zarr store there" if kind is None else f"kind {kind!r}"
            raise FlatDinoError(
                f"{option} {path!r} is not a {cls.NAME} ({found}); "
                f"pass the --out of `flatdino {cls.MAKER}`"
            )
        store = cls(path)
        if not store.attrs.get("complete"):
            raise FlatDinoError(f"{option} {path!r} is incomplete; finish {cls.MAKER} first")
        return store

    @property
    def num_images(self) -> int:
        return int(self.group[self.ROWS].shape[0])

    @property
    def class_names(self) -> list[str] | None:
        return self.attrs.get("class_names")

    def shards(self) -> list[Shard]:
        return shard_bounds(self.num_images, self.shard_size)

    def done_mask(self) -> np.ndarray:
        return np.asarray(self.group["done"][:], dtype=bool)

    def todo(self) -> list[Shard]:
        """The shards a job still has to write."""
        return [s for s, done in zip(self.shards(), self.done_mask(), strict=True) if not done]

    def valid_mask(self) -> np.ndarray:
        return np.asarray(self.group["valid"][:], dtype=bool)

    def valid_rows(self, limit: int | None = None) -> np.ndarray:
        """Indices of the rows that hold data (failed images excluded), the first `limit`."""
        return np.flatnonzero(self.valid_mask())[:limit]

    def mark_complete(self, **attrs) -> None:
        """The last write of a job: every shard is done, `complete` goes into the attrs."""
        assert self.done_mask().all(), "complete before every shard is done"
        self.group.attrs.update(
            {"complete": True, "num_valid": int(self.valid_mask().sum()), **attrs}
        )
        self.attrs = dict(self.group.attrs)

    def summary(self) -> dict:
        """What `flatdino info` prints."""
        done = self.done_mask()
        arrays = {
            name: {
                "shape": list(a.shape),
                "dtype": str(a.dtype),
                "chunks": list(a.chunks),
                **({"shards": list(a.shards)} if a.shards else {}),
            }  # fmt: skip
            for name in self.ARRAYS
            if name in self.group
            for a in [self.group[name]]
        }
        return {
            "path": str(self.path),
            "arrays": arrays,
            "images": self.num_images,
            "valid": int(self.valid_mask().sum()),
            "shards_done": f"{int(done.sum())}/{len(done)}",
            "complete": bool(self.attrs.get("complete")),
            "attrs": self.attrs,
        }


def create_atomically(path: Path, build: Callable[[zarr.Group, Path], None]) -> None:
    """Build a store in a folder beside `path` (`build(group, folder)`), then rename it into place."""
    for stale in path.parent.glob(f".{path.name}.creating-*"):  # left by a killed creation
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    build(zarr.create_group(str(tmp), zarr_format=3), tmp)
    os.replace(tmp, path)


def open_or_create(
    cls: type[S], out: str, fingerprint: dict, overwrite: bool,
    build: Callable[[zarr.Group, Path], None],
) -> S:  # fmt: skip
    """Resume the `cls` store at --out when its fingerprint matches, replace it with --overwrite,
    or create it with `build`. Anything at --out that is not a `cls` store is never deleted."""
    path = Path(out)
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()  # an empty directory made by the user: create the store in its place
    if path.exists():
        try:
            store = cls(path, mode="r+")
        except FlatDinoError:
            raise StoreMismatchError(
                f"--out {out!r} exists and is not a {cls.NAME}; choose another --out"
            ) from None
        if not overwrite:
            version = store.attrs.get("format_version", 1)
            if version != cls.FORMAT_VERSION:
                raise StoreMismatchError(
                    f"store {str(path)!r} has format {version}, this flatdino writes format "
                    f"{cls.FORMAT_VERSION}; pass --overwrite to rebuild it, or finish it with the "
                    "flatdino that made it"
                )
            check_fingerprint(store.path, store.attrs.get("fingerprint", {}), fingerprint)
            return store
        shutil.rmtree(path)
    create_atomically(path, build)
    return cls(path, mode="r+")


def check_fingerprint(path: Path, recorded: dict, fingerprint: dict) -> None:
    """Refuse to resume a store whose recorded fingerprint differs from the one asked for now."""
    diffs = [
        k for k in sorted(set(recorded) | set(fingerprint)) if recorded.get(k) != fingerprint.get(k)
    ]
    if diffs:
        detail = "; ".join(
            f"{k}: store has {recorded.get(k)!r}, now {fingerprint.get(k)!r}" for k in diffs
        )
        raise StoreMismatchError(
            f"store {str(path)!r} was made with other settings ({_shorten(detail)}); "
            "pass --overwrite to replace it, or choose another --out"
        )


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
