"""The rarer refusals of pipeline/checkpoints.py, each one line: a file of another kind named by
what it holds, a missing or unreadable config, a DiT folder without flow.json, a decoder file or
config of another layout; and a record from before --views compared without its views."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flatdino.pipeline.checkpoints import (
    FlowRecord,
    describe_json,
    load_dit,
    load_pixel_decoder,
    read_json,
)
from flatdino.pipeline.errors import FlatDinoError, MetadataError, WeightsError


@pytest.mark.parametrize(
    "data, said",
    [
        ({"kappa": 1.0}, "a DiT's flow.json (it has kappa)"),
        ({"zarr_format": 3, "node_type": "group"}, "a Zarr store's zarr.json"),
        ({"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}, "no flatdino config (its keys: a, b, c, d)"),
        ({}, "no flatdino config (its keys: none)"),
    ],
)
def test_a_json_of_no_model_is_described_by_what_it_holds(data, said):
    assert describe_json(data) == said


def test_a_flow_json_holding_a_zarr_json_names_both(tmp_path):
    with pytest.raises(MetadataError, match="^x is a Zarr store's zarr.json, not a DiT's flow"):
        FlowRecord.from_json({"zarr_format": 3}, "x")


def test_a_missing_config_and_an_unreadable_one_are_one_line(tmp_path):
    with pytest.raises(MetadataError, match=r"config.json' is missing, not a flatdino config; fix"):
        read_json(tmp_path / "config.json", "fix")
    (tmp_path / "dir.json").mkdir()  # readable by nobody as a file
    with pytest.raises(WeightsError, match=r"dir.json' is truncated or corrupt \(IsADirectory"):
        read_json(tmp_path / "dir.json", "fix")


def test_a_run_from_before_views_is_compared_without_its_views():
    old, new = FlowRecord(kappa=1.0), FlowRecord(kappa=1.0, views=2)
    assert old.first_difference(new, ("views", "kappa")) is None
    assert new.first_difference(old, ("views", "kappa")) == "views"
    assert old.first_difference(FlowRecord(kappa=2.0, views=2), ("views", "kappa")) == "kappa"


def checkpoint(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_a_dit_checkpoint_without_flow_json_is_refused(tmp_path):
    ckpt = checkpoint(tmp_path / "dit", {"rope_base": 100, "mlp_hidden_ratio": 4})
    with pytest.raises(FlatDinoError, match=r"^--dit '.*dit' is not a train-dit checkpoint \(no"):
        load_dit(str(ckpt))


def test_a_decoder_file_without_the_rae_tensors_names_the_missing_one(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "model.pt")
    with pytest.raises(WeightsError, match=r"not an RAE decoder state dict \(missing 'decoder_"):
        load_pixel_decoder(str(tmp_path / "model.pt"))


def test_a_decoder_config_with_unknown_fields_is_not_a_decoder_checkpoint(tmp_path):
    ckpt = checkpoint(tmp_path / "dec", {"patch_size": 16, "mlp_dim": 8, "colour": "red"})
    with pytest.raises(WeightsError, match=r"is not a pixel decoder checkpoint \(.*'colour'"):
        load_pixel_decoder(str(ckpt))


def test_a_config_holding_a_json_list_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(MetadataError, match=r"config.json' holds a JSON list, not a flatdino conf"):
        read_json(tmp_path / "config.json", "fix")


@pytest.mark.parametrize(
    ("change", "cause"), [({"enc_heads": 0}, ZeroDivisionError), ({"dec_heads": 3}, AssertionError)]
)
def test_a_hand_edited_vae_config_of_sizes_no_model_has_is_one_line(tmp_path, change, cause):
    """0 heads, or heads that do not divide the width: one line naming the checkpoint, not the
    model constructor's ZeroDivisionError or AssertionError."""
    import shutil

    from flatdino.pipeline.checkpoints import load_vae, resolve_vae

    run = tmp_path / "vae"
    shutil.copytree(Path(__file__).parent / "fixtures" / "format-v2" / "vae", run)
    for path in run.rglob("config.json"):  # the run's and its checkpoint's
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    ckpt = resolve_vae(str(run))
    with pytest.raises(FlatDinoError, match="does not fit this flatdino's") as e:
        load_vae(ckpt)
    assert "\n" not in str(e.value) and str(ckpt) in str(e.value)
    assert isinstance(e.value.__cause__, cause)
