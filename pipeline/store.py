"""The feature store: a Zarr v3 group of DINOv2 patch features plus a Parquet manifest.

Layout (FORMAT_VERSION 1), N images, V views, P patches, C channels:

    STORE/zarr.json                  attrs: format, fingerprint (backbone, weights sha256,
                                     preprocessing, input), class names, shard size, complete, ...
    STORE/features                   float16 (N, V, P, C), chunks (chunk_rows, V, P, C)
    STORE/labels                     int32 (N,), written once at creation
    STORE/valid                      bool (N,), chunks (shard_size,): false for undecodable images
    STORE/done                       bool (S,), chunks (1,): shard s fully written
    STORE/_errors/shard-XXXXXX.json  per-shard decode errors, written before `done`
    STORE/manifest.parquet           index, path, label, class_name, status, error

A shard (the unit of work) is `shard_size` consecutive images, a whole number of chunks of every
array, so no two workers ever write the same chunk file. `done[s]` is set only after shard s's
features, valid flags and errors are on disk; resume reads it. The store is created in a temporary
directory and renamed into place, so a crash never leaves a half-initialised store.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from .errors import FlatDinoError, StoreMismatchError

FORMAT_VERSION = 1
KIND = "flatdino.features"
MANIFEST = "manifest.parquet"
ERRORS_DIR = "_errors"
ARRAYS = ("features", "labels", "valid", "done")


@dataclass(frozen=True)
class Shard:
    """One unit of work: images [start, stop) of the store."""

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


def _write_parquet_atomic(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def store_kind(path: str | Path) -> str | None:
    """The `kind` attr of a flatdino Zarr store (feature or latents store); None if not a store."""
    if not (Path(path) / "zarr.json").exists():
        return None
    return zarr.open_group(str(path), mode="r").attrs.get("kind")


class FeatureStore:
    """Read and write access to one feature store directory."""

    def __init__(self, path: str | Path, mode: str = "r"):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise FlatDinoError(f"{str(self.path)!r} is not a Zarr store (no zarr.json)")
        self.group = zarr.open_group(str(self.path), mode=mode)
        self.attrs = dict(self.group.attrs)
        if self.attrs.get("kind") != KIND:
            raise FlatDinoError(
                f"{str(self.path)!r} is not a flatdino feature store (kind={self.attrs.get('kind')!r})"
            )
        self.shard_size = int(self.attrs["shard_size"])

    @property
    def features(self) -> zarr.Array:
        return self.group["features"]

    @property
    def num_images(self) -> int:
        return int(self.features.shape[0])

    def shards(self) -> list[Shard]:
        return shard_bounds(self.num_images, self.shard_size)

    def done_mask(self) -> np.ndarray:
        return np.asarray(self.group["done"][:], dtype=bool)

    def write_shard(
        self, shard: Shard, features: np.ndarray, valid: np.ndarray, errors: dict[int, str]
    ) -> None:
        """Write one shard's rows, then its errors, then mark it done (in that order)."""
        assert features.shape[0] == shard.stop - shard.start == valid.shape[0]
        self.group["features"][shard.start : shard.stop] = features
        self.group["valid"][shard.start : shard.stop] = valid
        body = json.dumps({str(k): v for k, v in sorted(errors.items())}, sort_keys=True)
        write_atomic(self.path / ERRORS_DIR / f"shard-{shard.index:06d}.json", body.encode())
        self.group["done"][shard.index] = True

    def shard_errors(self) -> dict[int, str]:
        errors: dict[int, str] = {}
        for f in sorted((self.path / ERRORS_DIR).glob("shard-*.json")):
            errors.update({int(k): v for k, v in json.loads(f.read_text()).items()})
        return errors

    def manifest(self) -> pa.Table:
        return pq.read_table(self.path / MANIFEST)

    def valid_rows(self, limit: int | None = None) -> np.ndarray:
        """Indices of the rows that hold features (failed images excluded), the first `limit`."""
        return np.flatnonzero(np.asarray(self.group["valid"][:], dtype=bool))[:limit]

    def finalize(self) -> None:
        """Once every shard is done: statuses and errors into the manifest, `complete` into attrs."""
        assert self.done_mask().all(), "finalize before every shard is done"
        table = self.manifest()
        valid = np.asarray(self.group["valid"][:], dtype=bool)
        errors = self.shard_errors()
        status = pa.array(np.where(valid, "ok", "failed").tolist(), pa.string())
        error = pa.array([errors.get(i) for i in range(self.num_images)], pa.string())
        table = table.set_column(table.schema.get_field_index("status"), "status", status)
        table = table.set_column(table.schema.get_field_index("error"), "error", error)
        _write_parquet_atomic(self.path / MANIFEST, table)
        self.group.attrs.update({"complete": True, "num_valid": int(valid.sum())})
        self.attrs = dict(self.group.attrs)

    def summary(self) -> dict:
        """What `flatdino info` prints."""
        done = self.done_mask()
        valid = np.asarray(self.group["valid"][:], dtype=bool)
        arrays = {
            name: {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks)}
            for name in ARRAYS
            for a in [self.group[name]]
        }
        return {
            "path": str(self.path),
            "arrays": arrays,
            "images": self.num_images,
            "valid": int(valid.sum()),
            "shards_done": f"{int(done.sum())}/{len(done)}",
            "complete": bool(done.all()),
            "attrs": self.attrs,
        }


def create_store(
    path: str | Path,
    *,
    shape: tuple[int, int, int, int],
    labels: np.ndarray,
    paths: list[str],
    class_names: list[str],
    shard_size: int,
    chunk_rows: int,
    attrs: dict,
) -> FeatureStore:
    """Create an empty store (all shards pending) atomically: build beside `path`, then rename."""
    n, v, p, c = shape
    if shard_size % chunk_rows:
        raise FlatDinoError(
            f"shard size {shard_size} must be a multiple of chunk rows {chunk_rows}"
        )
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.creating-*"):  # left by a killed creation
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    group = zarr.create_group(str(tmp), zarr_format=3)
    group.create_array(
        "features", shape=shape, chunks=(chunk_rows, v, p, c), dtype="float16", fill_value=0,
        compressors=None,  # float16 activations barely compress; spend no CPU on it
    )  # fmt: skip
    # labels are written once, here, by one process: large chunks (few files) are safe
    label_chunk = max(1, min(n, 1 << 16))
    group.create_array("labels", shape=(n,), chunks=(label_chunk,), dtype="int32", fill_value=-1)
    group.create_array("valid", shape=(n,), chunks=(shard_size,), dtype="bool", fill_value=False)
    num_shards = len(shard_bounds(n, shard_size))
    group.create_array("done", shape=(num_shards,), chunks=(1,), dtype="bool", fill_value=False)
    group["labels"][:] = labels.astype(np.int32)
    names = [class_names[i] for i in labels]
    table = pa.table(
        {
            "index": pa.array(np.arange(n, dtype=np.int64)),
            "path": pa.array(paths, pa.string()),
            "label": pa.array(labels.astype(np.int32)),
            "class_name": pa.array(names, pa.string()),
            "status": pa.array(["pending"] * n, pa.string()),
            "error": pa.array([None] * n, pa.string()),
        }
    )
    pq.write_table(table, tmp / MANIFEST)
    (tmp / ERRORS_DIR).mkdir()
    group.attrs.update(
        {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "shard_size": shard_size,
            "class_names": list(class_names),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "complete": False,
            **attrs,
        }
    )
    os.replace(tmp, path)
    return FeatureStore(path, mode="r+")


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
