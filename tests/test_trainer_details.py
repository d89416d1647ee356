"""The smaller trainer defects of issue 13 (defect 7): step-valued phases under --epochs, logged
parts averaged like the loss, the optimiser options of train-vae, --device under torchrun, and
leaving the process group at the end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import flatdino.trainers.train_vae as tv
from flatdino.cli.main import app
from flatdino.pipeline.errors import FlatDinoError
from flatdino.trainers.loop import LoopConfig, LoopHooks, train_loop
from flatdino.trainers.optim import make_schedule
from flatdino.trainers.runner import Dist, setup_distributed, teardown_distributed


def test_step_valued_phases_under_epochs_are_kept_exactly():
    cfg = SimpleNamespace(epochs=4, steps=None, lr=1e-4, warmup_steps=5, decay_steps=7)
    s = make_schedule(cfg, steps_per_epoch=10)
    assert (s.warmup, s.stable, s.decay, s.total) == (5, 28, 7, 40)  # before: warmup 0, decay 0
    paper = make_schedule(
        SimpleNamespace(epochs=50, steps=None, lr=1e-4, warmup_steps=None, decay_steps=None),
        steps_per_epoch=10,
    )
    assert (paper.warmup, paper.decay, paper.total) == (50, 50, 500)  # the epoch table as before


def test_logged_parts_are_means_over_the_step_like_the_loss(tmp_path):
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    recon = iter([1.0, 3.0, 5.0, 7.0])

    def loss(net, batch):
        value = net(batch).sum() * 0 + 1.0
        return {"loss": value, "recon": torch.tensor(next(recon))}, len(batch)

    hooks = LoopHooks(
        batches=lambda e, s: [torch.ones(2, 1)] * (4 - s),
        loss=loss,
        lr=lambda i: 0.0,
        save=lambda path: None,
    )
    lc = LoopConfig("toy", total=2, accum=2, log_every=1, ckpt_every=100, progress=False)
    train_loop(lc, Dist(), tmp_path, model, opt, hooks, {"step": 0, "micro_step": 0, "epoch": 0})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["recon"] for r in rows] == [2.0, 6.0]  # before: 3.0 and 7.0, the last micro batch


def test_train_vae_takes_grad_clip_and_weight_decay(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(tv, "train_vae", lambda cfg: seen.update(cfg=cfg) or {"step": 0})
    result = CliRunner().invoke(
        app,
        [
            "train-vae",
            "--features",
            str(tmp_path),
            "--out",
            str(tmp_path / "r"),
            "--steps",
            "1",
            "--grad-clip",
            "0.5",
            "--weight-decay",
            "0.1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (seen["cfg"].grad_clip, seen["cfg"].weight_decay) == (0.5, 0.1)


def test_device_cuda_n_is_that_gpu_in_one_process_and_refused_under_torchrun(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert setup_distributed("cuda:3").device == torch.device("cuda", 3) == chosen[-1]
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(FlatDinoError, match="cuda:3 under torchrun.*CUDA_VISIBLE_DEVICES"):
        setup_distributed("cuda:3")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # the caller's group
    d = setup_distributed("cuda")
    assert d.device == torch.device("cuda", 1) and not d.owns_group


def test_only_a_group_the_run_created_is_destroyed(monkeypatch):
    destroyed = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: destroyed.append(1))
    teardown_distributed(Dist(0, 2, owns_group=False))
    assert destroyed == []
    teardown_distributed(Dist(0, 2, owns_group=True))
    assert destroyed == [1]


def test_train_decoder_decodes_its_targets_off_the_training_thread(
    digits_val_store, tmp_path, monkeypatch
):
    import threading

    from flatdino.pipeline.targets import TargetImages
    from flatdino.trainers.train_decoder import TrainDecoderConfig, train_decoder

    threads = set()
    real = TargetImages.batch

    def batch(self, rows, views):
        threads.add(threading.current_thread().name)
        return real(self, rows, views)

    monkeypatch.setattr(TargetImages, "batch", batch)
    train_decoder(
        TrainDecoderConfig(
            features=str(digits_val_store),
            out=str(tmp_path / "dec"),
            preset="tiny",
            steps=2,
            batch_size=8,
            num_workers=0,
            device="cpu",
            progress=False,
            grid_every=0,
        )
    )  # the grid's targets: once, at set-up
    assert threads == {"flatdino-prefetch"}  # one batch ahead, while the step before trains
