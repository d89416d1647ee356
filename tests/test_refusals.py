"""The one-line refusals of the trainers and model configs that the end-to-end tests never reach:
each bad input names what was expected and the option that fixes it (the coverage ledger,
docs/coverage.md, listed these lines as never run)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import fake_latents_store
from flatdino.models.configs import dit_preset, vae_preset
from flatdino.pipeline.env import resolve_device
from flatdino.pipeline.errors import FlatDinoError
from flatdino.trainers import runner, tracking, train_decoder, train_dit, train_vae
from flatdino.trainers.configs import (
    RunConfig,
    TrainDecoderConfig,
    TrainDiTConfig,
    TrainVAEConfig,
)
from flatdino.trainers.optim import wsd_from_epochs

CASES = {
    "vae preset": (
        lambda: train_vae.build_model_config(TrainVAEConfig("f", "o", preset="vit-h"), None),
        r"--preset must be one of \['flatdino-32x128', .*got 'vit-h'",
    ),
    "dit preset": (
        lambda: train_dit.build_model_config(TrainDiTConfig("l", "o", preset="dit-h"), None),
        r"--preset must be one of \[.*'dit-xl'.*\]; got 'dit-h'",
    ),
    "decoder preset": (
        lambda: train_decoder._check(TrainDecoderConfig("f", "o", preset="vit-h"), None),
        r"--preset must be one of \['rae-vitb', .*got 'vit-h'",
    ),
    "decoder run length": (
        lambda: train_decoder._check(TrainDecoderConfig("f", "o"), None),
        r"give the run length with --steps N or --epochs E",
    ),
    "batch split": (
        lambda: runner.split_batch(10, 4, SimpleNamespace(world=1)),
        r"--batch-size 10 must equal micro batch 4 x 1 ranks x k; change --batch-size",
    ),
    "resume without trainer.pt": (
        lambda: runner.load_trainer_state(Path("/nonexistent-run")),
        r"'/nonexistent-run' has no trainer.pt to resume from; start without --resume",
    ),
    "absent GPU": (
        lambda: resolve_device("cuda:1"),
        r"--device cuda:1 but this worker sees no CUDA device; use --device auto or cpu",
    ),
    "plot without metrics": (
        lambda: tracking.plot_curves(Path("/nonexistent-run")),
        r"'/nonexistent-run' has no metrics.jsonl to plot; pass a run folder",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_the_option(case):
    call, message = CASES[case]
    with pytest.raises(FlatDinoError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


def test_plot_of_a_run_that_logged_no_number_yet(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "note": "start"}) + "\n")
    with pytest.raises(FlatDinoError, match=r"holds no metrics yet; plot after the first log"):
        tracking.plot_curves(tmp_path)


def test_train_dit_refuses_an_unknown_time_distribution(tmp_path):
    mu = np.zeros((8, 1, 4, 8), np.float32)
    store = fake_latents_store(tmp_path / "latents.zarr", mu, np.zeros(8, np.int64))
    cfg = TrainDiTConfig(
        str(store),
        str(tmp_path / "run"),
        preset="tiny",
        time_dist="beta",
        run=RunConfig(steps=1, batch_size=4, device="cpu"),
    )
    with pytest.raises(FlatDinoError, match=r"--time-dist must be uniform or logit-normal; got"):
        train_dit.train_dit(cfg)


@pytest.mark.parametrize(
    ("attrs", "fd_features", "message"),
    [
        ({}, None, r"--sample-every needs the VAE the latents came from, None, which is not there"),
        ({"vae_checkpoint": "."}, None, r"needs a reference feature store for FD, None is not"),
        ({"vae_checkpoint": "."}, "/no/such.zarr", r"'/no/such.zarr' is not there; pass --fd-"),
    ],
)
def test_training_samples_need_the_vae_and_a_reference_store(attrs, fd_features, message):
    cfg = TrainDiTConfig("l", "o", fd_features=fd_features)
    store = SimpleNamespace(attrs=attrs)
    with pytest.raises(FlatDinoError, match=message + r".*--sample-every 0"):
        train_dit.SampleMonitor(cfg, store, None, None, None, None)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: vae_preset("tiny", in_dim=8), "VAEConfig"),
        (lambda: dit_preset("tiny"), "DiTConfig"),
    ],
)
def test_model_configs_refuse_an_unknown_init(make, name):
    from dataclasses import replace

    with pytest.raises(ValueError, match=rf"{name}.init must be one of .*; got 'kaiming'"):
        replace(make(), init="kaiming")


def test_a_schedule_whose_warmup_and_decay_exceed_the_run_drops_the_warmup():
    s = wsd_from_epochs(3, 10, 1e-3, warmup_epochs=2, decay_epochs=2)
    assert (s.warmup, s.stable, s.decay) == (0, 10, 20)
    s = wsd_from_epochs(3, 10, 1e-3, warmup_epochs=2, decay_epochs=5)
    assert (s.warmup, s.stable, s.decay) == (0, 0, 30)
