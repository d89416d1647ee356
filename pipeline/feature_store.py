"""The feature store: a Zarr v3 group of DINOv2 patch features plus a Parquet manifest.

Layout (format 4; formats 2 and 3 lack `cls`), N images, V views, P patches, C channels:

    STORE/zarr.json                  attrs: format, fingerprint (backbone, weights sha256,
                                     preprocessing, input), class names, shard size, complete, ...
    STORE/features                   float16 (N, V, P, C); Zarr v3 sharding: one object per job
                                     shard (shard_size, V, P, C) holding inner chunks
                                     (chunk_rows, 1, P, C), so one view of one row is read alone
    STORE/feature_scales             int8 stores only (format 3, attrs feature_dtype "int8"):
                                     features holds int8 codes and this float16 (N, V, P) one
                                     scale per patch vector (`pipeline.quantise`), sharded and
                                     chunked as features
    STORE/cls                        format 4 only: float16 (N, V, C), each view's DINOv2 CLS token
                                     (the same non-affine final LayerNorm as the patches; float16
                                     in int8 stores too), one chunk (shard_size, V, C) per shard
    STORE/labels                     int32 (N,), written once at creation
    STORE/valid                      bool (N,), chunks (shard_size,): false for undecodable images
    STORE/done                       bool (S,), chunks (1,): shard s fully written
    STORE/_errors/shard-XXXXXX.json  a shard's decode errors (only shards that had some),
                                     written before `done`
    STORE/manifest.parquet           index, path, label, class_name, status, error

STORE is a local directory or an object-storage prefix (`pipeline.storage`). Shards, done markers,
creation and resume are `pipeline.store`'s. `done[s]` is set only after shard s's features, valid
flags and errors are written. Objects per store: 4 per shard (features, cls, valid, done) plus one
per shard with failed images, plus ~7; 1.28M images in shards of 256 are ~20,000 objects.

Format 1 (before per-view chunks) stored `features` as plain chunks (chunk_rows, V, P, C), one
file each: such stores are still read (every view of a chunk comes with each read); they are not
resumed by a job of this version, which writes format 2 (`--overwrite` rebuilds them).
Format 3 is format 2 with int8 features (`extract-features --feature-dtype int8`): a new number,
so that a flatdino from before it refuses such a store instead of reading codes as features.
Format 4 is format 2 or 3 (told apart by `feature_dtype`, as in 3) with the `cls` array; a job
writes it unless asked `--no-cls`, which writes format 2 or 3 as before (and so resumes an
unfinished store from before format 4: the fingerprint has `cls_token` only for format 4).
Readers get floats either way: `features` dequantises (float32) for the evaluations, while
`read_shard` and `read_drawn` return the stored batch (the pair) for a device to dequantise.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .errors import FlatDinoError, MetadataError, json_object
from .local_shards import LocalShards
from .quantise import FEATURE_DTYPES, Stored, dequantise, parts, quantise, stored
from .storage import Location, explained
from .store import Shard, ShardedStore, create, read_parquet, shard_bounds, utc_now, write_parquet

FLOAT16_FORMAT = 2  # per-view chunks, float16 features
INT8_FORMAT = 3  # format 2 with int8 codes + feature_scales
CLS_FORMAT = 4  # format 2 or 3 with the CLS token array `cls`
FORMAT_VERSION = CLS_FORMAT  # what a job writes by default (--no-cls: 2 or 3)
READABLE_FORMATS = (1, 2, 3, 4)
KIND = "flatdino.features"
MANIFEST = "manifest.parquet"
MANIFEST_COLUMNS = ("index", "path", "label", "class_name", "status", "error")
ERRORS_DIR = "_errors"
SCALES = "feature_scales"
CLS = "cls"
LABEL_CHUNK = 1 << 16  # labels are written once, at creation: few, large chunks


class FeatureStore(ShardedStore):
    """Read and write access to one feature store directory."""

    KIND = KIND
    FORMAT_VERSION = FORMAT_VERSION
    NAME = "flatdino feature store"
    MAKER = "extract-features"
    ROWS = "features"
    ARRAYS = ("features", SCALES, CLS, "labels", "valid", "done")
    RESUMABLE = (FLOAT16_FORMAT, INT8_FORMAT, CLS_FORMAT)  # the fingerprint tells them apart

    def __init__(self, path: str | Path, mode: str = "r", option: str = ""):
        super().__init__(path, mode, option)
        version = self.attrs.get("format_version", 1)
        if version not in READABLE_FORMATS:
            raise FlatDinoError(
                f"{str(self.path)!r} is a feature store of format {version}, which this flatdino "
                f"({'/'.join(map(str, READABLE_FORMATS))}) cannot read; rebuild it with "
                "`flatdino extract-features --overwrite` or use the flatdino that made it"
            )

    @property
    def feature_dtype(self) -> str:
        """How features are stored: "float16", or "int8" (codes + one scale per patch vector)."""
        return self.attrs.get("feature_dtype", "float16")

    @property
    def has_cls(self) -> bool:
        """Whether the store holds each view's CLS token (format 4)."""
        return self.attrs.get("format_version", 1) >= CLS_FORMAT

    def read_cls(self, start: int, stop: int) -> np.ndarray:
        """The float16 CLS tokens (n, V, C) of rows [start, stop): one read per chunk (a shard)."""
        return np.asarray(self.array(CLS)[start:stop])

    @property
    def features(self) -> zarr.Array | Dequantised:
        """The (N, V, P, C) features to index: the float16 array, or, for an int8 store, a view
        that reads codes and scales and returns float32."""
        if self.feature_dtype == "int8":
            return Dequantised(self.array("features"), self.array(SCALES))
        return self.array("features")

    def rows_array(self) -> zarr.Array | Dequantised:
        return self.features

    @property
    def per_view(self) -> bool:
        """One view of a row is read alone (format 2); format 1 chunks hold every view."""
        return self.attrs.get("format_version", 1) >= 2

    @property
    def sample_shape(self) -> tuple[int, int]:
        """(P, C) of one view of one row."""
        _, _, p, c = self.features.shape
        return int(p), int(c)

    @property
    def row_parts(self) -> list[tuple[tuple[int, ...], np.dtype]]:
        """(shape, dtype) of one row-view of each stored part: [((P, C), float16)], or for int8
        [((P, C), int8), ((P,), float16)]."""
        return [(tuple(a.shape[2:]), a.dtype) for a in self._stored]

    @cached_property
    def _stored(self) -> tuple[zarr.Array, ...]:
        """The arrays of a stored batch: (features,) or (codes, scales), opened once (their
        metadata is an object read, ~0.4 ms on local disk, a GET on S3: not one per block)."""
        if self.feature_dtype == "int8":
            return self.array("features"), self.array(SCALES)
        return (self.array("features"),)

    @cached_property
    def _local(self) -> tuple[LocalShards, ...] | None:
        """Direct readers of `_stored`'s shard files (a local store in the layout extract-features
        writes), or None: zarr reads them."""
        where = None if self.location.remote else self.location.path
        fix = f"delete {str(self.path)!r} and run `flatdino {self.MAKER}` again"
        readers = [LocalShards.of(a, where and where / a.basename, fix) for a in self._stored]
        return None if None in readers else tuple(readers)

    def read_shard(self, shard: Shard) -> tuple[Stored, np.ndarray]:
        """A shard's stored features (n, V, P, C) (int8: the pair with scales (n, V, P),
        `pipeline.quantise`) and valid flags (n,): one zarr read, or on local disk every row-view
        read straight from the shard file (`LocalShards`: 10 GB/s here against zarr's 0.5-0.7)."""
        n, v = shard.stop - shard.start, self._stored[0].shape[1]  # no metadata read per shard
        if self._local and self.per_view:
            rows, views = np.repeat(np.arange(shard.start, shard.stop), v), np.tile(np.arange(v), n)
            got = self.read_drawn(shard.start, shard.stop, rows, views)  # (n * V, P[, C])
            feats = stored([p.reshape(n, v, *p.shape[1:]) for p in parts(got)])
        else:
            feats = stored([a[shard.start : shard.stop] for a in self._stored])
        valid = np.asarray(self.array("valid")[shard.start : shard.stop], dtype=bool)
        return feats, valid

    def read_drawn(
        self,
        lo: int,
        hi: int,
        rows: np.ndarray,
        views: np.ndarray,
        into: list[list[np.ndarray]] | None = None,
    ) -> Stored | None:
        """Stored features[rows, views] (m, P, C) (int8: with scales (m, P)) for `rows` inside
        the block [lo, hi) and one view each: only the drawn views are read (format >= 2, as
        runs of consecutive rows, `_read_runs`, or row by row from a local shard, `LocalShards`),
        or the block's chunk whole (format 1). `into`: per part, the m arrays to read the rows
        into (the loader's shared batch buffers and row slots), and nothing returned."""
        arrays = self._stored
        out = None
        if into is None:
            out = [np.empty((len(rows), *a.shape[2:]), a.dtype) for a in arrays]  # (m, P[, C])
            into = [list(part) for part in out]
        if self._local and self.per_view and len(rows):
            for reader, part in zip(self._local, into, strict=True):
                reader.read(rows, views, part)
        else:
            for array, part in zip(arrays, into, strict=True):
                got = np.empty((len(rows), *array.shape[2:]), array.dtype)
                if not self.per_view:  # format 1 (float16 only): every view, read whole once
                    got[...] = array[lo:hi][rows - lo, views]
                else:
                    sync(_read_runs(array.async_array, rows, views, got))
                for target, row in zip(part, got, strict=True):
                    target[...] = row
        return None if out is None else stored(out)

    def write_shard(
        self,
        shard: Shard,
        features: np.ndarray,
        valid: np.ndarray,
        errors: dict[int, str],
        cls: np.ndarray | None = None,
    ) -> None:
        """Write one shard's rows (features, and the CLS tokens (n, V, C) of a format-4 store),
        then its errors (if any), then mark it done (in that order)."""
        assert features.shape[0] == shard.stop - shard.start == valid.shape[0]
        assert (cls is not None) == self.has_cls, "CLS tokens given iff the store keeps them"
        with explained(self.path):  # a failing object store: one line, from any worker
            if self.feature_dtype == "int8":
                codes, scales = quantise(features)
                self.array("features")[shard.start : shard.stop] = codes
                self.array(SCALES)[shard.start : shard.stop] = scales
            else:
                self.array("features")[shard.start : shard.stop] = features
            if cls is not None:
                self.array(CLS)[shard.start : shard.stop] = cls.astype(np.float16)
            self.array("valid")[shard.start : shard.stop] = valid
            if errors:  # a shard without failures writes no object (fewer objects per store)
                body = json.dumps({str(k): v for k, v in sorted(errors.items())}, sort_keys=True)
                self.location.write(f"{ERRORS_DIR}/shard-{shard.index:06d}.json", body.encode())
            self.array("done")[shard.index] = True

    def shard_errors(self) -> dict[int, str]:
        errors: dict[int, str] = {}
        for key in self.location.keys(ERRORS_DIR):
            raw = self.location.read(key)
            where = f"{self.location.url.rstrip('/')}/{key}"
            record = json_object(raw, where, "a shard's decode errors", self.damaged_fix(self.path))
            errors.update({int(k): v for k, v in record.items()})
        return errors

    def manifest(self) -> pa.Table:
        table = read_parquet(self.location, MANIFEST, self.damaged_fix(self.path))
        missing = [c for c in MANIFEST_COLUMNS if c not in table.column_names]
        if missing:
            raise MetadataError(
                f"{self.location.url.rstrip('/') + '/' + MANIFEST!r} has no column "
                f"{', '.join(missing)}, not a {self.NAME}'s manifest; {self.damaged_fix(self.path)}"
            )
        return table

    def finalize(self) -> None:
        """Once every shard is done: statuses and errors into the manifest, `complete` into attrs."""
        assert self.done_mask().all(), "finalize before every shard is done"
        table = self.manifest()
        valid = self.valid_mask()
        errors = self.shard_errors()
        status = pa.array(np.where(valid, "ok", "failed").tolist(), pa.string())
        error = pa.array([errors.get(i) for i in range(self.num_images)], pa.string())
        table = table.set_column(table.schema.get_field_index("status"), "status", status)
        table = table.set_column(table.schema.get_field_index("error"), "error", error)
        write_parquet(self.location, MANIFEST, table)  # one put; `complete` comes after it
        self.mark_complete()

    @staticmethod
    def layout(
        *,
        shape: tuple[int, int, int, int],
        labels: np.ndarray,
        paths: list[str],
        class_names: list[str],
        shard_size: int,
        chunk_rows: int,
        attrs: dict,
        feature_dtype: str = "float16",
        cls_token: bool = False,
    ) -> Callable[[zarr.Group, Location], None]:
        """The `build` of an empty store (all shards pending), for `store.open_or_create`."""
        if shard_size % chunk_rows:
            raise FlatDinoError(
                f"shard size {shard_size} must be a multiple of chunk rows {chunk_rows}; "
                "change --shard-size"
            )
        if feature_dtype not in FEATURE_DTYPES:
            raise FlatDinoError(
                f"--feature-dtype must be one of {FEATURE_DTYPES}; got {feature_dtype!r}"
            )
        int8 = feature_dtype == "int8"

        def build(group: zarr.Group, location: Location) -> None:
            n, v, p, c = shape
            group.create_array(
                "features",
                shape=shape,
                shards=(shard_size, v, p, c),
                chunks=(chunk_rows, 1, p, c),
                dtype=feature_dtype,
                fill_value=0,
                compressors=None,  # activations barely compress; spend no CPU on it
            )
            if int8:  # beside the codes, in the same objects' layout (one per shard)
                group.create_array(
                    SCALES,
                    shape=(n, v, p),
                    shards=(shard_size, v, p),
                    chunks=(chunk_rows, 1, p),
                    dtype="float16",
                    fill_value=0,
                    compressors=None,
                )
            if cls_token:  # float16 in int8 stores too: C values against P * C codes
                group.create_array(
                    CLS,
                    shape=(n, v, c),
                    chunks=(shard_size, v, c),  # one object per job shard, as `valid`
                    dtype="float16",
                    fill_value=0,
                    compressors=None,
                )
            # labels are written once, here, by one process: large chunks (few files) are safe
            label_chunk = max(1, min(n, LABEL_CHUNK))
            group.create_array(
                "labels", shape=(n,), chunks=(label_chunk,), dtype="int32", fill_value=-1
            )
            group.create_array(
                "valid", shape=(n,), chunks=(shard_size,), dtype="bool", fill_value=False
            )
            num_shards = len(shard_bounds(n, shard_size))
            group.create_array(
                "done", shape=(num_shards,), chunks=(1,), dtype="bool", fill_value=False
            )
            group["labels"][:] = labels.astype(np.int32)
            write_parquet(location, MANIFEST, _pending_manifest(labels, paths, class_names))
            group.attrs.update(
                {
                    "kind": KIND,
                    "format_version": format_version(feature_dtype, cls_token),
                    **({"feature_dtype": "int8", "quantisation": QUANTISATION} if int8 else {}),
                    "shard_size": shard_size,
                    "class_names": list(class_names),
                    "created": utc_now(),
                    "complete": False,
                    **attrs,
                }
            )

        return build

    @classmethod
    def create(cls, path: str | Path, **layout) -> FeatureStore:
        """A new, empty store at `path` (see `layout` for the arguments)."""
        create(Location(str(path)), KIND, FORMAT_VERSION, cls.layout(**layout))
        return cls(path, mode="r+")


def format_version(feature_dtype: str, cls_token: bool) -> int:
    """The format a store of these settings is written in (module docstring)."""
    if cls_token:
        return CLS_FORMAT
    return INT8_FORMAT if feature_dtype == "int8" else FLOAT16_FORMAT


def _runs(rows: np.ndarray, views: np.ndarray) -> list[tuple[int, int]]:
    """[i, j) spans of `rows` that are consecutive row numbers with one view each."""
    breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(views) != 0)) + 1
    return list(zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(rows)].tolist(), strict=True))


async def _read_runs(
    features: zarr.AsyncArray, rows: np.ndarray, views: np.ndarray, out: np.ndarray
) -> None:
    """array[rows, views] into `out` ((m, P, C) codes or features, (m, P) scales): one slice per run of consecutive rows with
    one view, all runs in one event-loop call, each decoded straight into its part of `out`.

    Not an integer-array (orthogonal) selection: zarr 3.1 hands one to the sharding codec as a
    per-element coordinate selection, ~100x slower than the bytes it reads (zarr-python#3829).
    Not one blocking call per run either: each costs ~2 ms of thread hand-offs, 3-4x the read."""
    prototype = default_buffer_prototype()
    reads = []
    for i, j in _runs(rows, views):
        selection = (slice(int(rows[i]), int(rows[j - 1]) + 1), int(views[i]))  # basic: no ix_
        buffer = prototype.nd_buffer.from_numpy_array(out[i:j])  # a view: zarr writes into out
        reads.append(features.get_orthogonal_selection(selection, out=buffer, prototype=prototype))
    await asyncio.gather(*reads)


QUANTISATION = "int8 codes, symmetric absmax per (row, view, patch) vector, float16 scales in "
QUANTISATION += f"{SCALES}; value = code * scale"


class Dequantised:
    """An int8 store's features as a read-only (N, V, P, C) array of float32: indexing reads the
    codes and their scales (the selection's first three axes) and multiplies."""

    def __init__(self, codes: zarr.Array, scales: zarr.Array):
        self.codes, self.scales = codes, scales
        self.shape, self.shards, self.chunks = codes.shape, codes.shards, codes.chunks
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, selection) -> np.ndarray:
        return self._read(selection, lambda a, s: a[s])

    def get_orthogonal_selection(self, selection) -> np.ndarray:
        return self._read(selection, lambda a, s: a.get_orthogonal_selection(s))

    def _read(self, selection, read: Callable) -> np.ndarray:
        sel = selection if isinstance(selection, tuple) else (selection,)
        assert len(sel) <= 3, "select rows, views or patches, not channels"
        return dequantise((read(self.codes, sel), read(self.scales, sel)))


def object_count(
    num_images: int,
    shard_size: int,
    failed_shards: int = 0,
    int8: bool = False,
    cls_token: bool = True,
) -> int:
    """Objects (files) of a complete store of this format, from the layout alone: per shard its
    features object (+ its scales object, int8; + its CLS object, format 4), valid chunk and done
    marker (+1 errors object for a shard with failures); zarr.json of the group and of its 4-6
    arrays, the labels chunks and the manifest. (A shard whose every image failed writes no valid
    or cls chunk: zarr skips chunks equal to the fill value.)"""
    shards = -(-num_images // shard_size)
    extra = int(int8) + int(cls_token)  # arrays beside features, labels, valid and done
    labels = -(-num_images // LABEL_CHUNK)
    return (3 + extra) * shards + failed_shards + 5 + extra + labels + 1


def _pending_manifest(labels: np.ndarray, paths: list[str], class_names: list[str]) -> pa.Table:
    n = len(labels)
    return pa.table(
        {
            "index": pa.array(np.arange(n, dtype=np.int64)),
            "path": pa.array(paths, pa.string()),
            "label": pa.array(labels.astype(np.int32)),
            "class_name": pa.array([class_names[i] for i in labels], pa.string()),
            "status": pa.array(["pending"] * n, pa.string()),
            "error": pa.array([None] * n, pa.string()),
        }
    )
