"""Library calls leave the calling process as they found it: its RNG, its logging, its thread
count, torch.hub's directory (docs/development.md)."""

from __future__ import annotations

import logging
from unittest import mock

import pytest
import torch

from conftest import tiny_config
from flatdino.eval.fid import inception_model
from flatdino.pipeline.extract import extract_features
from flatdino.trainers.train_vae import TrainVAEConfig, train_vae


def _logging_state() -> tuple:
    root, ours = logging.getLogger(), logging.getLogger("flatdino")
    return list(root.handlers), root.level, list(ours.handlers), ours.level


def test_a_trainer_keeps_the_callers_rng_and_logging(digits_val_store, tmp_path):
    torch.manual_seed(1234)
    before_rng, before_logging = torch.get_rng_state(), _logging_state()
    out = tmp_path / "vae"
    train_vae(
        TrainVAEConfig(
            features=str(digits_val_store),
            out=str(out),
            preset="tiny",
            steps=2,
            batch_size=16,
            num_workers=0,
            device="cpu",
            log_every=1,
            progress=False,
        )
    )
    assert torch.equal(torch.get_rng_state(), before_rng)
    assert _logging_state() == before_logging
    lines = (out / "log.txt").read_text().splitlines()
    assert any(line.startswith("step=2 ") for line in lines)  # the run's own log still written


def test_a_trainer_is_reproducible_whatever_the_callers_rng(digits_val_store, tmp_path):
    """The trainer seeds itself: the caller's RNG state changes nothing in the run."""
    losses = []
    for i, seed in enumerate((0, 999)):
        torch.manual_seed(seed)
        m = train_vae(
            TrainVAEConfig(
                features=str(digits_val_store),
                out=str(tmp_path / f"r{i}"),
                preset="tiny",
                steps=2,
                batch_size=16,
                num_workers=0,
                device="cpu",
                progress=False,
            )
        )
        losses.append(m["loss"])
    assert losses[0] == losses[1]


@pytest.mark.parametrize("threads", [0, 1])
def test_a_local_job_gives_the_thread_count_back(tmp_path, threads):
    before = torch.get_num_threads()
    cfg = tiny_config("digits", tmp_path / f"s{threads}", split="val", torch_threads=threads)
    extract_features(cfg)
    assert torch.get_num_threads() == before


def test_inception_from_a_local_file_leaves_the_hub_alone(inception_weights):
    weights = inception_weights
    file_state = torch.load(weights, weights_only=True)
    hub = torch.hub.get_dir()
    with mock.patch.object(torch.hub, "set_dir", side_effect=AssertionError("hub dir changed")):
        loaded = inception_model(str(weights)).state_dict()
    assert torch.hub.get_dir() == hub
    # InceptionV3 renames the layers it keeps (blocks.0.0 is Conv2d_1a_3x3): match by value
    in_file = {v.numpy().tobytes() for v in file_state.values() if v.is_floating_point()}
    floats = [v for v in loaded.values() if v.is_floating_point()]
    assert len(floats) > 100 and all(v.numpy().tobytes() in in_file for v in floats)
