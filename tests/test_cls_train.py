"""train-dit --cls end to end: both generator kinds train on the latents and the stored DINOv2 CLS
token, resume bit for bit and sample through the one chain (cls.npy beside the features, the same
bytes under 1 and 2 gloo ranks); the monitor and sweep-cfg run a CLS model; a store without the
token is refused in one line; import-official reads an official checkpoint with `in_cls_dim`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flatdino.cli.main import app

runner = CliRunner()
T, d, C = 4, 6, 5


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _store(tmp_path: Path, cls: bool = True) -> Path:
    """36 rows of 3 classes, one view, with a CLS token (N, 1, C) that follows the class."""
    from test_dit_dh import _vae_checkpoint

    from conftest import fake_latents_store

    sha = _vae_checkpoint(tmp_path / "vae", T, d)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 12)
    mu = rng.normal(size=(3, 1, T, d))[labels] + 0.3 * rng.normal(size=(36, 1, T, d))
    tokens = 2 * rng.normal(size=(3, 1, C))[labels] + 0.1 * rng.normal(size=(36, 1, C))
    return fake_latents_store(
        tmp_path / "lat.zarr",
        mu.astype(np.float32),
        labels,
        fingerprint={"vae_sha256": sha},
        cls=tokens.astype(np.float16) if cls else None,
    )


def _sample_args(run: Path, vae: Path, out: Path) -> list[str]:
    args = ["sample", "--dit", run, "--vae", vae, "--out", out, "--num-samples", "5"]
    args += ["--batch-size", "2", "--steps", "3", "--cfg", "2", "--save-features"]
    return [str(a) for a in (*args, "--device", "cpu", "--no-progress")]


@pytest.mark.parametrize("preset", ["tiny", "dit-dh-tiny"])
def test_train_dit_cls_trains_resumes_bit_exactly_and_samples(tmp_path, preset):
    from safetensors.torch import load_file

    from conftest import train_dit_straight_and_resumed
    from flatdino.pipeline.checkpoints import load_dit

    store = _store(tmp_path)
    kw = dict(
        latents=str(store), preset=preset, cls=True, steps=6, batch_size=8, micro_batch=4,
        lr=1e-3, ema_decay=0.9, log_every=1, ckpt_every=100, progress=False, device="cpu",
    )  # fmt: skip
    straight = train_dit_straight_and_resumed(tmp_path, 4, **kw)
    a = load_file(str(straight / "checkpoints" / "ema.safetensors"))
    assert a["cls_out.weight"].shape == (C, a["cls_out.weight"].shape[1])
    config = json.loads((straight / "checkpoints" / "config.json").read_text())
    assert config["cls_dim"] == C
    model = load_dit(str(straight))[0]
    assert model.cfg.cls_dim == C

    invoke(*_sample_args(straight, tmp_path / "vae", tmp_path / "s"))
    cls, latents = np.load(tmp_path / "s" / "cls.npy"), np.load(tmp_path / "s" / "latents.npy")
    assert cls.shape == (5, C) and cls.dtype == np.float32 and latents.shape == (5, T, d)
    assert np.all(np.isfinite(cls)) and cls.std() > 0


@pytest.mark.parametrize("preset", ["tiny", "dit-dh-tiny"])
def test_cls_samples_are_the_same_bytes_under_two_ranks(tmp_path, preset):
    """torchrun with 2 gloo ranks writes the same latents, features and CLS tokens as one
    process, for both generator kinds: each sample's two noises depend on (seed, sample) only."""
    from conftest import torchrun
    from flatdino.trainers.train_dit import TrainDiTConfig, train_dit

    store, run = _store(tmp_path), tmp_path / "run"
    kw = dict(preset=preset, cls=True, steps=3, batch_size=8, progress=False, device="cpu")
    train_dit(TrainDiTConfig(latents=str(store), out=str(run), **kw))
    invoke(*_sample_args(run, tmp_path / "vae", tmp_path / "one"))
    two = torchrun(2, *_sample_args(run, tmp_path / "vae", tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    for name in ("cls.npy", "latents.npy", "features.npy"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_train_dit_cls_under_two_gloo_ranks(tmp_path):
    """DDP over a CLS model (both CLS layers take part, so no unused-parameter error); rank 0's
    checkpoint rebuilds with the token."""
    from conftest import tiny_dit_args, torchrun
    from flatdino.pipeline.checkpoints import load_dit

    run = tmp_path / "ddp"
    done = torchrun(2, *tiny_dit_args(_store(tmp_path), run, 2, "--preset", "dit-dh-tiny", "--cls"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_dit(str(run))[0].cfg.cls_dim == C


def test_a_store_without_the_cls_token_is_refused_in_one_line(tmp_path):
    store = _store(tmp_path, cls=False)
    args = ["train-dit", "--latents", store, "--out", tmp_path / "run", "--preset", "tiny"]
    result = runner.invoke(app, [str(a) for a in (*args, "--cls", "--steps", "1")])
    assert result.exit_code == 1
    line = result.output.strip()
    assert "\n" not in line and "--latents" in line and "holds no DINOv2 CLS token" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("name", ["dit", "dh"])
def test_import_official_reads_an_in_cls_dim_checkpoint(tmp_path, name):
    """An official checkpoint with a CLS token (config item) imports into a folder `sample`
    takes; the imported model's two velocities are the official ones."""
    from test_cls_gen import DATA, _rel
    from test_dit_dh import _orbax_checkpoint

    from conftest import npz_arrays, official_weights
    from flatdino.pipeline.checkpoints import load_dit

    ref = npz_arrays(DATA)
    tree = official_weights(ref, name)
    fixed = ("t_embedder/W", "feat_rope/", *(("pos_embed",) if name == "dit" else ()))
    config = str(ref[f"{name}/config"])
    ckpt = _orbax_checkpoint(tmp_path / "official", tree, config, 300, fixed)
    out = tmp_path / "imported"
    invoke("import-official", ckpt, "--out", out)
    assert json.loads((out / "config.json").read_text())["cls_dim"] == 6
    model = load_dit(str(out), ema=False)[0]
    x, cls, t, y = (torch.from_numpy(ref[f"{name}/{k}"]) for k in ("x", "cls", "t", "y"))
    with torch.no_grad():
        v, v_cls = model((x, cls), t, y.long())
    assert _rel(v, ref[f"{name}/v"]) < 1e-5 and _rel(v_cls, ref[f"{name}/v_cls"]) < 1e-5


def test_the_monitor_and_sweep_cfg_run_a_cls_model(tmp_path):
    """On the digits chain (a format-4 feature store keeps the token): train-dit --cls samples
    for its FD monitor, and sweep-cfg's cells run the CLS model through the same chain."""
    from conftest import build_chain

    monitor = ("--sample-every", "2", "--fd-samples", "8", "--sample-steps", "2")
    chain = build_chain(tmp_path, invoke, ("--steps", "4", "--cls", "--lr", "1e-2", *monitor))
    assert json.loads((chain / "dit" / "checkpoints" / "config.json").read_text())["cls_dim"] > 0
    rows = [json.loads(line) for line in (chain / "dit" / "metrics.jsonl").read_text().split("\n")
            if line]  # fmt: skip
    fd = [r["fd_dinov2"] for r in rows if "fd_dinov2" in r]
    assert len(fd) == 2 and all(np.isfinite(v) and v > 0 for v in fd)
    args = ["sweep-cfg", "--dit", chain / "dit", "--features", chain / "features.zarr"]
    args += ["--out", tmp_path / "sweep", "--scales", "1,2", "--interval-starts", "0", "--n", "16"]
    args += ["--no-ema", "--steps", "3", "--batch-size", "8", "--device", "cpu", "--no-progress"]
    assert "2 cells computed" in invoke(*args).output


def test_resuming_a_cls_run_without_cls_names_the_difference(tmp_path):
    args = ["train-dit", "--latents", _store(tmp_path), "--out", tmp_path / "run"]
    args += ["--preset", "tiny", "--batch-size", "8", "--device", "cpu", "--no-progress"]
    invoke(*args, "--cls", "--steps", "1", "--sample-every", "0")
    result = runner.invoke(app, [str(a) for a in (*args, "--steps", "2", "--resume")])
    assert result.exit_code == 1 and "(cls_dim 5, now 0)" in result.output
    assert "--cls" in result.output and "\n" not in result.output.strip()
