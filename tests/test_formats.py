"""Stores and run folders written by earlier versions still open and give the same results.

`tests/fixtures/format-v1` was written by the code of commit 8a368b1 (the tree before the layout
change) with `tests/fixtures/make_format_v1.py`: 16 digits through the tiny backbone (one view),
a tiny VAE (2 steps), its latents, a tiny DiT (2 steps), and 4 samples from it. Trainer states
were left out to keep the fixture small (3.5 MB). Its stores still open and train; its VAE and DiT
checkpoints predate the official models' layout and are refused in one line.
`tests/fixtures/format-v2` is the same script run after the models became the official ones.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flatdino.cli.main import app
from flatdino.models.flow import euler_sample, sample_noise
from flatdino.pipeline.checkpoints import load_dit, load_vae, resolve_vae
from flatdino.pipeline.encode import EncodeConfig, encode_latents
from flatdino.pipeline.errors import FlatDinoError
from flatdino.pipeline.feature_store import FeatureStore
from flatdino.pipeline.latent_store import LatentStore
from flatdino.sampling.sample import SampleConfig, class_labels, sample
from flatdino.trainers.train_dit import TrainDiTConfig, train_dit

FIXTURE = Path(__file__).parent / "fixtures" / "format-v1"
FIXTURE2 = Path(__file__).parent / "fixtures" / "format-v2"


def test_old_feature_store_opens():
    store = FeatureStore.open_complete(str(FIXTURE / "features.zarr"), "--features")
    assert store.features.shape == (16, 1, 256, 64) and store.num_images == 16
    assert store.valid_rows().tolist() == list(range(16))
    assert store.done_mask().all() and store.shard_errors() == {}
    assert store.manifest().column("status").to_pylist() == ["ok"] * 16


def test_old_latents_store_opens():
    old = LatentStore.open_complete(str(FIXTURE / "latents.zarr"), "--latents")
    assert old.token_shape == (8, 16) and old.num_views == 1 and old.num_classes() == 10
    mean, std = old.stats()
    assert mean.shape == std.shape == (8, 16)


def test_latents_store_is_what_encode_latents_writes_now(tmp_path):
    old = LatentStore.open_complete(str(FIXTURE2 / "latents.zarr"), "--latents")
    out = tmp_path / "latents.zarr"
    encode_latents(
        EncodeConfig(
            features=str(FIXTURE2 / "features.zarr"),
            vae=str(FIXTURE2 / "vae"),
            out=str(out),
            backend="local",
            device="cpu",
            progress=False,
        )
    )
    new = LatentStore(out)
    for name in ("labels", "valid", "done"):
        assert new.group[name][:].tobytes() == old.group[name][:].tobytes(), name
    # The encoder's float32 matmuls round differently on another CPU (oneDNN picks kernels by
    # instruction set): bit-identical where the fixture was written, within ~1e-6 elsewhere
    # (8.3e-7 at most, on values up to 3.4, measured on an AMD EPYC).
    for name in ("mu", "mu_mean", "mu_std"):
        np.testing.assert_allclose(new.group[name][:], old.group[name][:], rtol=1e-6, atol=2e-6)
    assert new.attrs["fingerprint"] == old.attrs["fingerprint"]
    # v1 has one key fewer (from before --precision): an unfinished v1 store is refused, not mixed
    v1 = LatentStore(FIXTURE / "latents.zarr").attrs["fingerprint"]
    assert set(new.attrs["fingerprint"]) - set(v1) == {"precision"}


def test_runs_load_and_sample_as_before(tmp_path):
    """`sample` from the v2 checkpoints gives the fixture's latents, and the sampler's result on
    the per-sample noise streams."""
    vae, _ = load_vae(resolve_vae(str(FIXTURE2 / "vae")))
    dit, flow, norm, _ = load_dit(str(FIXTURE2 / "dit"))
    assert vae.cfg.tokens == dit.cfg.tokens == 8 and flow.views == 1
    cfg = SampleConfig(
        dit=str(FIXTURE2 / "dit"),
        out=str(tmp_path / "samples"),
        n=4,
        steps=4,
        batch_size=4,
        vae=str(FIXTURE2 / "vae"),
        device="cpu",
        progress=False,
        save_features=True,
    )
    shape = (4, dit.cfg.tokens, dit.cfg.latent_dim)
    y = torch.from_numpy(class_labels(cfg, dit.cfg.num_classes))
    sample(cfg)
    got = np.load(tmp_path / "samples" / "latents.npy")
    np.testing.assert_array_equal(got, np.load(FIXTURE2 / "expected-sample-latents.npy"))
    noise = torch.from_numpy(np.stack([sample_noise(0, i, shape[1:]) for i in range(4)]))
    x1 = euler_sample(
        dit, noise, y, cfg.steps, float(flow.kappa), cfg.cfg, cfg.cfg_interval, dit.null_class
    )
    np.testing.assert_allclose(got, norm.denormalize(x1).numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("run", ["vae", "dit"])
def test_v1_checkpoints_of_the_older_model_layout_are_one_line(run):
    load = (lambda p: load_vae(resolve_vae(p))) if run == "vae" else load_dit
    with pytest.raises(FlatDinoError, match="must be trained again") as e:
        load(str(FIXTURE / run))
    assert "\n" not in str(e.value)


def test_old_latents_store_trains_a_dit(tmp_path):
    metrics = train_dit(
        TrainDiTConfig(
            latents=str(FIXTURE / "latents.zarr"),
            out=str(tmp_path / "dit"),
            preset="tiny",
            steps=2,
            batch_size=8,
            device="cpu",
            progress=False,
        )
    )
    assert metrics["step"] == 2 and np.isfinite(metrics["loss"])


@pytest.mark.parametrize("fixture", [FIXTURE, FIXTURE2])
@pytest.mark.parametrize("name", ["features.zarr", "latents.zarr", "vae", "dit"])
def test_info_reads_old_stores_and_runs(name, fixture, tmp_path):
    path = tmp_path / name
    shutil.copytree(fixture / name, path)  # info only reads; a copy keeps the fixture pristine
    result = CliRunner().invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert ("complete: True" in result.output) == name.endswith(".zarr")
