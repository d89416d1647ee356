"""What every flatdino Zarr store shares: shards, done markers, its kind, and its life cycle.

A store is a Zarr v3 group, on a local disk or under an object-storage prefix
(`pipeline.storage`), whose attrs carry `kind` (which store class reads it), a `fingerprint`
(what must match for a job to resume it), `shard_size` and `complete`. Its rows are split into
shards of `shard_size` consecutive rows (the unit of work of a job, a whole number of chunks of
every array, so no two workers ever write the same object); `done[s]` is set only after shard s
is fully written, and resume reads it.

`open_or_create` is the one implementation of a job's start: resume a matching store, refuse a
mismatch, replace it with --overwrite (only a store of our kind, never anything else), or create
it. No step needs a rename (object stores have none); each is a put of whole objects, ordered:

    1. zarr.json with {kind, format_version, creating: true}   the prefix is ours from here on
    2. the arrays, labels, manifest (the class's `layout`)
    3. zarr.json with creating: false                           the store exists (one small put)
    4. per shard: its data, then done[s]                        the shard exists
    5. finalize (manifest, statistics), then complete: true     the store is complete

A job holds the store's writer lock (`pipeline.lock`) from before step 1 to its end, so two jobs
never write one store. A job killed in 1-2 leaves a store marked `creating`, which the next run deletes and builds
again; killed in 4 or 5, it resumes from the done markers.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from tqdm import tqdm

from .errors import FlatDinoError, MetadataError, StoreMismatchError, json_object
from .lock import LOCK_NAME
from .storage import Location, is_url


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


def store_kind(path: str | Path, expected: str = "a flatdino store's zarr.json") -> str | None:
    """The `kind` attr of a flatdino Zarr store (feature or latents store); None if not a store;
    a damaged zarr.json is a MetadataError that names `expected`."""
    attrs = Location(str(path)).attrs(expected)
    return None if attrs is None else attrs.get("kind")


def describe_kind(kind: str | None) -> str:
    """What a store of `kind` is, for messages: "a flatdino latents store (encode-latents --out)"."""
    cls = ShardedStore.KINDS.get(kind)
    if cls is not None:
        return f"a {cls.NAME} (kind {kind!r}, written by `flatdino {cls.MAKER}`)"
    return "a Zarr group with no flatdino kind" if kind is None else f"a store of kind {kind!r}"


def absent(path: str) -> bool:
    """Nothing at a local `path` (object-storage prefixes are told apart by their zarr.json)."""
    return not is_url(path) and not Path(path).exists()


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
    RESUMABLE: tuple[int, ...] = ()  # formats a job of this version finishes (default: the above)
    ARRAYS: tuple[str, ...] = ()  # arrays listed by `summary`, when present
    KINDS: dict[str, type[ShardedStore]] = {}  # every store class by its KIND (describe_kind)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        ShardedStore.KINDS[cls.KIND] = cls

    def __init__(self, path: str | Path, mode: str = "r", option: str = ""):
        """Open the store at `path`; one that is missing, damaged, of another kind or whose
        creation was interrupted is a one-line error (naming `option` when given)."""
        self.location = Location(str(path))
        self.path = str(path)  # as given: a local path or a URL (messages, attrs)
        where = f"{option} {self.path!r}".lstrip()
        fix = f"pass the --out of `flatdino {self.MAKER}`"
        if absent(self.path):
            raise FlatDinoError(f"{where} does not exist; {fix}")
        try:
            attrs = self.location.attrs(f"a {self.NAME}'s zarr.json", self.damaged_fix(self.path))
        except MetadataError as e:
            if not option:
                raise
            raise MetadataError(f"{where}: {e}") from None
        if attrs is None:
            raise FlatDinoError(
                f"{where} is not a Zarr store (no zarr.json), not a {self.NAME}; {fix}"
            )
        if attrs.get("kind") != self.KIND:
            raise FlatDinoError(
                f"{where} is {describe_kind(attrs.get('kind'))}, not a {self.NAME}; {fix}"
            )
        if attrs.get("creating"):
            raise FlatDinoError(
                f"{where} is a {self.NAME} whose creation was interrupted; run "
                f"`flatdino {self.MAKER}` again to build it"
            )
        self.group = self.location.open_group(mode)
        self.attrs = dict(self.group.attrs)
        self.shard_size = int(self.attrs["shard_size"])

    @classmethod
    def open_complete(cls: type[S], path: str, option: str) -> S:
        """A complete store for `option`, or a one-line error that says what to run."""
        store = cls(path, option=option)
        if not store.attrs.get("complete"):
            raise FlatDinoError(f"{option} {path!r} is incomplete; finish {cls.MAKER} first")
        return store

    @classmethod
    def damaged_fix(cls, path: str) -> str:
        """What to do about a damaged metadata file of the store at `path`."""
        return f"restore the file, or delete {path!r} and run `flatdino {cls.MAKER}` again"

    def array(self, name: str) -> zarr.Array:
        """The array `name`; its zarr.json missing, damaged or a group's is one line."""
        where = f"{self.location.url.rstrip('/')}/{name}/zarr.json"
        expected = f"the {name} array's metadata of a {self.NAME}"
        try:
            node = self.group[name]
        except (KeyError, ValueError, TypeError):  # absent; JSONDecodeError; bad fields
            raw = self.location.read(f"{name}/zarr.json")
            json_object(raw, where, expected, self.damaged_fix(self.path))  # empty, truncated
            raise MetadataError(
                f"{where!r} is not a valid Zarr array's metadata, not {expected}; "
                f"{self.damaged_fix(self.path)}"
            ) from None
        if not isinstance(node, zarr.Array):
            raise MetadataError(
                f"{where!r} is a Zarr group's metadata, not {expected}; {self.damaged_fix(self.path)}"
            )
        return node

    def rows_array(self):
        """The (N, V, ...) rows as floats to index (a feature store's int8 codes dequantised)."""
        return self.array(self.ROWS)

    def has(self, name: str) -> bool:
        """Whether the store holds the array `name` (an optional one: logvar)."""
        return self.location.read(f"{name}/zarr.json") is not None

    @property
    def num_images(self) -> int:
        return int(self.array(self.ROWS).shape[0])

    @property
    def num_views(self) -> int:
        return int(self.array(self.ROWS).shape[1])

    @property
    def block_rows(self) -> int:
        """Rows of one storage object of the rows array: the unit a reader reads whole."""
        return row_block(self.array(self.ROWS))

    @property
    def class_names(self) -> list[str] | None:
        return self.attrs.get("class_names")

    def labels(self) -> np.ndarray:
        """(N,) int64 class labels of every row (valid or not)."""
        return np.asarray(self.array("labels")[:], dtype=np.int64)

    def shards(self) -> list[Shard]:
        return shard_bounds(self.num_images, self.shard_size)

    def done_mask(self) -> np.ndarray:
        return np.asarray(self.array("done")[:], dtype=bool)

    def todo(self) -> list[Shard]:
        """The shards a job still has to write."""
        return [s for s, done in zip(self.shards(), self.done_mask(), strict=True) if not done]

    def valid_mask(self) -> np.ndarray:
        return np.asarray(self.array("valid")[:], dtype=bool)

    def valid_rows(self, limit: int | None = None) -> np.ndarray:
        """Indices of the rows that hold data (failed images excluded), the first `limit`."""
        return np.flatnonzero(self.valid_mask())[:limit]

    def view0_blocks(
        self, max_rows: int | None = None, desc: str | None = None
    ) -> Iterator[np.ndarray]:
        """View 0 of the valid rows, float32 (k, P, C) (latents: (k, T, d)), one storage block at
        a time in row order (a block may hold no valid row): every block, or at most `max_rows`
        rows as whole blocks spread evenly over the store (a class-sorted store still gives every
        part of it; no block is read in part). A tqdm bar named `desc` when given."""
        data, valid = self.rows_array(), self.valid_mask()
        step = row_block(data)  # whole storage objects (view 0 only, where views are chunked apart)
        starts = np.arange(0, data.shape[0], step)
        if max_rows is not None and len(starts) * step > max_rows:
            keep = max(1, max_rows // step)
            starts = starts[np.linspace(0, len(starts) - 1, keep).round().astype(int)]
        for lo in tqdm(starts, desc=desc, disable=desc is None):
            yield np.asarray(data[lo : lo + step, 0], np.float32)[valid[lo : lo + step]]

    def pooled_view0(
        self, max_rows: int | None = None, desc: str | None = None
    ) -> Iterator[np.ndarray]:
        """`view0_blocks` mean-pooled over positions, (k, C) float32 per block: the vectors of
        FD-DINOv2, `eval fid --space dinov2` and `eval knn`."""
        for block in self.view0_blocks(max_rows, desc):
            yield block.mean(1)

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
            }
            for name in self.ARRAYS
            if self.has(name)
            for a in [self.array(name)]
        }
        return {
            "path": self.path,
            "arrays": arrays,
            "images": self.num_images,
            "valid": int(self.valid_mask().sum()),
            "shards_done": f"{int(done.sum())}/{len(done)}",
            "complete": bool(self.attrs.get("complete")),
            "attrs": self.attrs,
        }


def create(
    location: Location,
    kind: str,
    version: int,
    build: Callable[[zarr.Group, Location], None],
    overwrite: bool = True,
) -> None:
    """Create a store at `location` (empty or absent) without a rename: zarr.json marked
    `creating` first, then `build(group, location)`, then the one small write that ends it.
    `overwrite` clears the location first (its writer's lock too: jobs clear it themselves)."""
    group = zarr.create_group(
        location.store,
        zarr_format=3,
        overwrite=overwrite,
        attributes={"kind": kind, "format_version": version, "creating": True},
    )
    build(group, location)
    group.attrs.update({"creating": False})  # the last write: the store exists


def open_or_create(
    cls: type[S],
    out: str,
    fingerprint: dict,
    overwrite: bool,
    build: Callable[[zarr.Group, Location], None],
    options: Mapping[str, str] | None = None,
) -> S:
    """Resume the `cls` store at --out when its fingerprint matches, replace it with --overwrite,
    or create it with `build`. Anything at --out that is not a `cls` store is never deleted.
    `options` names the option that sets a fingerprint key, for the refusal's message.
    The caller holds --out's writer lock (`pipeline.lock.writer_lock`), so a store that another
    live job writes is refused before anything is deleted; the lock itself is kept."""
    location = Location(str(out))
    if not location.remote and location.path.is_file():
        raise StoreMismatchError(f"--out {out!r} is a file, not a {cls.NAME}; choose another --out")
    unsure = "--overwrite does not delete a store it cannot read; delete it yourself or choose "
    try:
        attrs = location.attrs(f"a {cls.NAME}'s zarr.json", unsure + "another --out")
    except MetadataError as e:
        raise MetadataError(f"--out {out!r}: {e}") from None
    if attrs is None:
        if without_lock(location.keys()):  # objects or files, not a Zarr group: never ours to touch
            what = "objects" if is_url(out) else "files"
            raise StoreMismatchError(
                f"--out {out!r} holds {what} and is not a {cls.NAME} (no zarr.json; "
                f"--overwrite does not delete it either); choose another --out"
            )
    elif attrs.get("kind") != cls.KIND:
        raise StoreMismatchError(
            f"--out {out!r} is {describe_kind(attrs.get('kind'))}, not a {cls.NAME} ("
            f"--overwrite does not delete it either); choose another --out"
        )
    elif attrs.get("creating") or overwrite:  # an interrupted creation of ours, or asked to
        location.delete_all(keep=LOCK_NAME)  # the caller holds the lock (writer_lock)
    else:
        store = cls(out, mode="r+")
        version = store.attrs.get("format_version", 1)
        if version not in (cls.RESUMABLE or (cls.FORMAT_VERSION,)):
            raise StoreMismatchError(
                f"store {out!r} has format {version}, this flatdino writes format "
                f"{cls.FORMAT_VERSION}; pass --overwrite to rebuild it, or finish it with the "
                "flatdino that made it"
            )
        check_fingerprint(out, store.attrs.get("fingerprint", {}), fingerprint, options)
        return store
    create(location, cls.KIND, cls.FORMAT_VERSION, build, overwrite=False)
    return cls(out, mode="r+")


def without_lock(keys: list[str]) -> list[str]:
    """The keys of a location that are not the writer's lock (`pipeline.lock`)."""
    return [k for k in keys if not k.startswith(LOCK_NAME)]


def check_fingerprint(
    path: str, recorded: dict, fingerprint: dict, options: Mapping[str, str] | None = None
) -> None:
    """Refuse to resume a store whose recorded fingerprint differs from the one asked for now;
    the message names the option of a differing key found in `options` (key -> option)."""
    diffs = [
        k for k in sorted(set(recorded) | set(fingerprint)) if recorded.get(k) != fingerprint.get(k)
    ]
    if diffs:
        detail = "; ".join(
            f"{k}: store has {recorded.get(k)!r}, now {fingerprint.get(k)!r}" for k in diffs
        )
        named = [options[k] for k in diffs if k in (options or {})]
        match = f"set {' and '.join(named)} as the store was made, " if named else ""
        raise StoreMismatchError(
            f"store {path!r} was made with other settings ({_shorten(detail)}); "
            f"{match}pass --overwrite to replace it, or choose another --out"
        )


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_parquet(location: Location, key: str, table: pa.Table) -> None:
    """`table` as one Parquet object at `key` (a single put: no reader sees half of it)."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    location.write(key, sink.getvalue())


def read_parquet(location: Location, key: str, fix: str) -> pa.Table:
    """The Parquet object `key`; missing, empty or truncated is one line that says `fix`."""
    raw = location.read(key)
    where = f"{location.url.rstrip('/')}/{key}"
    if raw is None:
        raise MetadataError(f"{location.url!r} has no {key}; {fix}")
    try:
        return pq.read_table(pa.BufferReader(raw))
    except (pa.ArrowException, OSError) as e:  # ArrowInvalid: not Parquet, or cut short
        found = "is empty" if not raw else f"is truncated or not Parquet ({str(e)[:80]})"
        raise MetadataError(f"{where!r} {found}, not a feature store's manifest; {fix}") from None
