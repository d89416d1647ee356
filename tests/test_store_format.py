"""Feature store format 2 (issue 13, defect 3): per-view inner chunks inside one storage object per
job shard; one view of one row is read alone; format-1 stores are still read, not resumed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

from conftest import tiny_config
from flatdino.pipeline import local_shards
from flatdino.pipeline.errors import FlatDinoError, StoreMismatchError
from flatdino.pipeline.extract import extract_features
from flatdino.pipeline.feature_store import FeatureStore
from flatdino.pipeline.loader import FeatureBatches, LoaderConfig

FIXTURE = Path(__file__).parent / "fixtures" / "format-v1"


@pytest.fixture(params=["zarr", "direct"])
def bytes_read(request, monkeypatch):
    """Bytes the loader's reader takes from the files, from now on: through zarr's local store
    (whole objects and byte ranges), or read straight from the shard files (`LocalShards`)."""
    count = {"bytes": 0}
    if request.param == "zarr":
        real = LocalStore.get

        async def get(self, key, prototype=None, byte_range=None):
            got = await real(self, key, prototype, byte_range)
            if got is not None and key.startswith("features/"):
                count["bytes"] += len(got.to_bytes())
            return got

        monkeypatch.setattr(LocalStore, "get", get)
        monkeypatch.setattr(FeatureStore, "_local", None)  # every store read through zarr
    else:
        preadv, pread = local_shards.os.preadv, local_shards.os.pread

        def count_preadv(fd, buffers, offset):
            count["bytes"] += (got := preadv(fd, buffers, offset))
            return got

        def count_pread(fd, n, offset):
            count["bytes"] += len(got := pread(fd, n, offset))
            return got

        monkeypatch.setattr(local_shards.os, "preadv", count_preadv)
        monkeypatch.setattr(local_shards.os, "pread", count_pread)
    return count


def two_view_store(path: Path, n: int = 96, shard: int = 32, c: int = 16) -> Path:
    rng = np.random.default_rng(0)
    store = FeatureStore.create(
        path,
        shape=(n, 2, 256, c),
        labels=np.zeros(n, np.int32),
        paths=[str(i) for i in range(n)],
        class_names=["a"],
        shard_size=shard,
        chunk_rows=1,
        attrs={"fingerprint": {}},
    )
    for s in store.shards():
        rows = rng.standard_normal((s.stop - s.start, 2, 256, c)).astype(np.float16)
        store.write_shard(s, rows, np.ones(len(rows), bool), {})
    store.finalize()
    return path


def test_one_object_per_job_shard_and_per_view_inner_chunks(tmp_path):
    store = FeatureStore(two_view_store(tmp_path / "f.zarr"))
    assert store.attrs["format_version"] == 2 and store.per_view
    assert store.features.shards == (32, 2, 256, 16) and store.features.chunks == (1, 1, 256, 16)
    objects = [
        p
        for p in (store.location.path / "features").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    ]
    assert len(objects) == 3  # 96 rows / 32 per shard; format 1 made 12 (8 rows each)


def test_the_loader_reads_only_the_drawn_view(tmp_path, bytes_read):
    path = two_view_store(tmp_path / "f.zarr")
    loader = FeatureBatches(
        FeatureStore(path), LoaderConfig(16, seed=0, shuffle_buffer=8, num_workers=0)
    )
    reference = zarr.open_array(str(path / "features"), mode="r")[:]
    bytes_read["bytes"] = 0
    views = loader.views(0)
    for x, _, rows in loader.epoch(0):
        assert np.array_equal(x.numpy(), reference[rows, views[rows]])
    needed = 96 * 256 * 16 * 2  # one view of every row, float16
    assert needed <= bytes_read["bytes"] <= 1.1 * needed  # format 1: 2x (every view of a chunk)


def test_a_format_1_store_is_read_the_same(tmp_path):
    old = FeatureStore(FIXTURE / "features.zarr")
    assert not old.per_view and old.attrs["format_version"] == 1
    loader = FeatureBatches(old, LoaderConfig(4, seed=0, shuffle_buffer=4, num_workers=0))
    reference = old.features[:]
    views = loader.views(0)
    for x, _, rows in loader.epoch(0):
        assert np.array_equal(x.numpy(), reference[rows, views[rows]])


def test_a_format_1_store_is_not_resumed_but_rebuilt_with_overwrite(tmp_path):
    out = tmp_path / "features.zarr"
    shutil.copytree(FIXTURE / "features.zarr", out)
    with pytest.raises(
        StoreMismatchError, match="format 1, this flatdino writes format 4.*--overwrite"
    ):
        extract_features(tiny_config("digits", out, split="val"))
    extract_features(tiny_config("digits", out, split="val", overwrite=True))
    assert FeatureStore(out).attrs["format_version"] == 4  # with the CLS token (test_cls.py)


def test_a_store_of_an_unknown_format_is_refused_in_one_line(tmp_path):
    out = tmp_path / "features.zarr"
    shutil.copytree(FIXTURE / "features.zarr", out)
    zarr.open_group(str(out), mode="r+").attrs["format_version"] = 99
    with pytest.raises(FlatDinoError, match="format 99.*extract-features --overwrite"):
        FeatureStore(out)
