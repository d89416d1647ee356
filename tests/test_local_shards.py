"""Rows read straight from a local store's shard files (`pipeline.local_shards`) equal zarr's
reads of them, in every layout extract-features writes; a damaged shard is one line; any other
array is left to zarr."""

from __future__ import annotations

from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

from flatdino.pipeline.errors import FlatDinoError
from flatdino.pipeline.feature_store import FeatureStore
from flatdino.pipeline.local_shards import MISSING, LocalShards
from flatdino.pipeline.quantise import parts

N, V, P, C, SHARD = 70, 3, 4, 5, 16


def store_of(path: Path, dtype: str, chunk_rows: int, written: int) -> FeatureStore:
    """A store of N rows whose first `written` shards hold random features (the rest never
    written: zarr's fill value)."""
    store = FeatureStore.create(
        path,
        shape=(N, V, P, C),
        labels=np.zeros(N, np.int32),
        paths=[str(i) for i in range(N)],
        class_names=["a"],
        shard_size=SHARD,
        chunk_rows=chunk_rows,
        attrs={"fingerprint": {}},
        feature_dtype=dtype,
    )
    rng = np.random.default_rng(0)
    for shard in store.shards()[:written]:
        n = shard.stop - shard.start
        features = rng.standard_normal((n, V, P, C)).astype(np.float32)
        store.write_shard(shard, features, np.ones(n, bool), {})
    return FeatureStore(path)


def through_zarr(store: FeatureStore, *args) -> list[np.ndarray]:
    store.__dict__["_local"] = None  # this store reads through zarr from now on
    try:
        return parts(store.read_drawn(*args))
    finally:
        del store.__dict__["_local"]


@pytest.mark.parametrize(("dtype", "chunk_rows"), [("float16", 1), ("int8", 1), ("float16", 2)])
def test_drawn_rows_equal_zarrs_read_of_them(tmp_path, dtype, chunk_rows):
    """Any rows of a block with any views, written shards and the never-written last ones, read
    directly (float16; int8 codes and their scales; chunks of two rows), equal zarr's read."""
    store = store_of(tmp_path / "f.zarr", dtype, chunk_rows, written=3)
    assert store._local is not None and len(store._local) == (2 if dtype == "int8" else 1)
    rng = np.random.default_rng(1)
    for lo in range(0, N, SHARD):
        hi = min(lo + SHARD, N)
        rows = np.flatnonzero(rng.random(hi - lo) < 0.7) + lo
        views = rng.integers(0, V, len(rows))
        direct = parts(store.read_drawn(lo, hi, rows, views))
        expected = through_zarr(store, lo, hi, rows, views)
        assert all(np.array_equal(a, b) for a, b in zip(direct, expected, strict=True))
        assert (np.abs(direct[0]).sum() > 0) == (lo < 3 * SHARD)  # unwritten shards: zeros


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_whole_shards_equal_zarrs_read_of_them(tmp_path, dtype):
    """`read_shard` (encode-latents' reader): every row and view of a shard, written or not,
    read directly, equals zarr's read of the same slice, in its (n, V, ...) shape."""
    store = store_of(tmp_path / "f.zarr", dtype, 2, written=3)
    for shard in store.shards():
        direct, valid = store.read_shard(shard)
        store.__dict__["_local"] = None
        expected, valid_zarr = store.read_shard(shard)
        del store.__dict__["_local"]
        for a, b in zip(parts(direct), parts(expected), strict=True):
            assert a.shape[:2] == (shard.stop - shard.start, V) and np.array_equal(a, b)
        assert np.array_equal(valid, valid_zarr)


def test_chunks_missing_from_a_written_shard_read_as_the_fill_value(tmp_path):
    """A shard that zarr wrote only some chunks of (the rest are the index's empty entries)."""
    store = store_of(tmp_path / "f.zarr", "float16", 1, written=0)
    array = zarr.open_array(str(tmp_path / "f.zarr" / "features"), mode="r+")
    array[2, 1] = np.full((P, C), 3, np.float16)
    got = store.read_drawn(0, SHARD, np.array([1, 2, 3]), np.array([1, 1, 1]))
    assert got[1].tolist() == np.full((P, C), 3.0).tolist() and not got[[0, 2]].any()
    (expected,) = through_zarr(store, 0, SHARD, np.array([1, 2, 3]), np.ones(3, int))
    assert np.array_equal(got, expected)
    shard = tmp_path / "f.zarr" / "features" / "c" / "0" / "0" / "0" / "0"
    assert shard.stat().st_size == P * C * 2 + SHARD * V * 16 + 4  # one chunk and the index


def rewrite_index(shard: Path, edit) -> None:
    """Apply `edit` to the shard's (rows, views, 2) index and store it with a valid checksum."""
    raw = bytearray(shard.read_bytes())
    size = SHARD * V * 16
    index = np.frombuffer(bytes(raw[-size - 4 : -4]), "<u8").reshape(SHARD, V, 2).copy()
    edit(index)
    raw[-size - 4 : -4] = index.tobytes()
    raw[-4:] = google_crc32c.value(index.tobytes()).to_bytes(4, "little")
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-1] + b"\0"), "does not match its checksum"),
        (lambda f: f.write_bytes(b"short"), "does not match its checksum"),
        (lambda f: rewrite_index(f, lambda i: i.__setitem__((0, 0, 1), 7)), "of 7 bytes"),
        (lambda f: rewrite_index(f, lambda i: i.__setitem__((0, 0, 0), 10**9)), "at 1000000000"),
    ],
)
def test_a_damaged_shard_is_one_line_naming_the_file_and_the_fix(tmp_path, damage, says):
    """A shard whose index fails its checksum (a flipped byte, a truncated file), or whose
    index points at a chunk of the wrong size or past the file's end."""
    store = store_of(tmp_path / "f.zarr", "float16", 1, written=1)
    shard = tmp_path / "f.zarr" / "features" / "c" / "0" / "0" / "0" / "0"
    damage(shard)
    with pytest.raises(FlatDinoError, match=says) as error:
        store.read_drawn(0, SHARD, np.arange(4), np.zeros(4, int))
    assert str(shard) in str(error.value) and "run `flatdino extract-features` again" in str(
        error.value
    )


def test_arrays_of_other_layouts_and_remote_stores_are_left_to_zarr(tmp_path):
    """Compressed, unsharded, big-endian, or not on local disk: no direct reader."""
    layouts = {
        "zstd": dict(shards=(8, 2, 4), compressors=zarr.codecs.ZstdCodec()),
        "unsharded": dict(chunks=(1, 1, 4)),
        "big-endian": dict(shards=(8, 2, 4), dtype=">f2"),
        "views together": dict(shards=(8, 2, 4), chunks=(1, 2, 4)),
    }
    for name, layout in layouts.items():
        array = zarr.create_array(
            str(tmp_path / name),
            shape=(16, 2, 4),
            **{"chunks": (1, 1, 4), "dtype": "<f2", "compressors": None, **layout},
        )
        assert LocalShards.of(array, tmp_path / name, "fix") is None, name
    plain = zarr.create_array(
        str(tmp_path / "p"),
        shape=(16, 2, 4),
        shards=(8, 2, 4),
        chunks=(1, 1, 4),
        dtype="<f2",
        compressors=None,
    )
    assert LocalShards.of(plain, tmp_path / "p", "fix") is not None
    assert LocalShards.of(plain, None, "fix") is None  # remote
    assert np.iinfo(np.uint64).max == MISSING
