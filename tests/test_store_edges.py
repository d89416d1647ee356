"""pipeline/store.py's rarer paths: stores named by kind in refusals, an interrupted creation, a
damaged zarr.json without an option to name, an array whose metadata is JSON but not Zarr's, and
view-0 blocks spread evenly over a store when only some rows are asked for."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import fake_latents_store
from flatdino.pipeline.errors import FlatDinoError, MetadataError, StoreMismatchError
from flatdino.pipeline.feature_store import FeatureStore
from flatdino.pipeline.latent_store import LatentStore
from flatdino.pipeline.store import describe_kind, open_or_create


def latents(path, n: int = 64):
    mu = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 1, 2, 3))
    return fake_latents_store(path, np.ascontiguousarray(mu), np.zeros(n, np.int64), shard_size=8)


def test_stores_without_a_known_kind_are_described_as_such():
    assert describe_kind(None) == "a Zarr group with no flatdino kind"
    assert describe_kind("other.kind") == "a store of kind 'other.kind'"


def test_an_out_of_another_store_kind_is_never_replaced(tmp_path):
    out = str(latents(tmp_path / "lat.zarr"))
    with pytest.raises(StoreMismatchError, match=r"is a flatdino latents store \(kind 'flatdino"):
        open_or_create(FeatureStore, out, {}, True, lambda group, location: None)
    assert LatentStore(out).num_images == 64  # untouched, even with overwrite


def test_an_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreMismatchError, match="^--out '.*f' is a file, not a flatdino feature"):
        open_or_create(FeatureStore, str(tmp_path / "f"), {}, True, lambda group, loc: None)


def test_an_interrupted_creation_says_to_run_the_maker_again(tmp_path):
    out = latents(tmp_path / "lat.zarr")
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["creating"] = True
    (out / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(FlatDinoError, match="creation was interrupted; run `flatdino encode-lat"):
        LatentStore(out)


def test_a_damaged_zarr_json_without_an_option_is_the_bare_message(tmp_path):
    out = latents(tmp_path / "lat.zarr")
    (out / "zarr.json").write_text("{trunc")
    with pytest.raises(MetadataError, match=r"^'.*lat.zarr/zarr.json' is truncated or corrupt"):
        LatentStore(out)


def test_an_array_metadata_that_is_json_but_not_zarr_is_one_line(tmp_path):
    out = latents(tmp_path / "lat.zarr")
    (out / "mu" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "array"}))
    with pytest.raises(MetadataError, match=r"mu/zarr.json' is not a valid Zarr array's metadata"):
        LatentStore(out).array("mu")


def test_view0_blocks_under_a_row_limit_are_whole_blocks_spread_over_the_store(tmp_path):
    store = LatentStore(latents(tmp_path / "lat.zarr"))  # 8 blocks of 8 rows
    rows = [block[:, 0, 0].tolist() for block in store.view0_blocks(max_rows=20)]
    assert rows == [list(range(0, 8)), list(range(56, 64))]  # 2 whole blocks: first and last
    assert len(list(store.view0_blocks(max_rows=3))) == 1  # never fewer than one block
