"""train-vae end to end on CPU: run folder, exact resume, DDP, refusals, non-finite stop, learning."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import fake_feature_store, torchrun
from flatdino.pipeline.errors import FlatDinoError
from flatdino.trainers import train_vae as tv
from flatdino.trainers.runner import NonFiniteLossError
from flatdino.trainers.train_vae import TrainVAEConfig, train_vae


def small(store: Path, out: Path, **kw) -> TrainVAEConfig:
    base = TrainVAEConfig(
        features=str(store),
        out=str(out),
        preset="tiny",
        steps=6,
        batch_size=16,
        lr=1e-3,
        num_workers=0,
        log_every=1,
        ckpt_every=3,
        progress=False,
        shuffle_buffer=16,
    )
    return dataclasses.replace(base, **kw)


def weights(run: Path, sub: str = "checkpoints") -> dict[str, torch.Tensor]:
    return load_file(str(run / sub / "model.safetensors"))


def test_run_folder_and_metrics(digits_val_store, tmp_path):
    run = tmp_path / "run"
    train_vae(
        small(
            digits_val_store,
            run,
            val_features=str(digits_val_store),
            eval_every=3,
            steps=6,
            warmup_steps=2,
            decay_steps=2,
        )
    )
    for name in ("config.json", "log.txt", "metrics.jsonl", "checkpoints", "best", "pre-decay"):
        assert (run / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "recon", "kl", "lr", "grad_norm", "samples_per_s"} <= set(steps[0])
    assert [r["step"] for r in rows if "val_mse" in r] == [3, 6]
    assert steps[0]["lr"] == pytest.approx(1e-6) and steps[-1]["lr"] < 1e-3  # warmup, decay
    assert torch.load(run / "pre-decay" / "trainer.pt", weights_only=True)["state"]["step"] == 4
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["in_dim"] == 64 and saved["train"]["preset"] == "tiny"


def test_resume_is_bit_identical(digits_val_store, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_vae(
        small(digits_val_store, straight, steps=30, ckpt_every=100)
    )  # crosses an epoch (23 steps)
    train_vae(small(digits_val_store, split, steps=30, ckpt_every=100, stop_after=25))
    assert (
        torch.load(split / "checkpoints" / "trainer.pt", weights_only=True)["state"]["step"] == 25
    )
    train_vae(small(digits_val_store, split, steps=30, ckpt_every=100, resume=True))
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = torch.load(straight / "checkpoints" / "trainer.pt", weights_only=True)["optimizer"]
    opt_b = torch.load(split / "checkpoints" / "trainer.pt", weights_only=True)["optimizer"]
    assert all(
        torch.equal(opt_a["state"][i]["exp_avg"], opt_b["state"][i]["exp_avg"])
        for i in opt_a["state"]
    )


def test_existing_run_needs_resume(digits_val_store, tmp_path):
    train_vae(small(digits_val_store, tmp_path / "r", steps=1))
    with pytest.raises(FlatDinoError, match="--resume"):
        train_vae(small(digits_val_store, tmp_path / "r", steps=1))


def test_mismatched_stores_are_refused_before_training(digits_val_store, tmp_path):
    other = fake_feature_store(tmp_path / "c32.zarr", 32)
    with pytest.raises(
        FlatDinoError, match=r"\(256, 32\) features but the model expects \(256, 64\)"
    ):
        train_vae(small(digits_val_store, tmp_path / "r1", val_features=str(other)))
    assert not (tmp_path / "r1").exists()
    train_vae(small(digits_val_store, tmp_path / "r2", steps=1))
    with pytest.raises(FlatDinoError, match="does not match"):
        train_vae(small(other, tmp_path / "r2", steps=2, resume=True))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(
    digits_val_store, tmp_path, monkeypatch
):
    real, calls = tv.vae_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] > 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(tv, "vae_loss", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="step 3.*intact"):
        train_vae(small(digits_val_store, run, steps=6, ckpt_every=3))
    assert torch.load(run / "checkpoints" / "trainer.pt", weights_only=True)["state"]["step"] == 3
    assert all(torch.isfinite(t).all() for t in weights(run).values())


def test_two_process_ddp_on_cpu(digits_val_store, tmp_path):
    run = tmp_path / "ddp"
    args = [
        "train-vae",
        "--features",
        str(digits_val_store),
        "--val-features",
        str(digits_val_store),
        "--out",
        str(run),
        "--preset",
        "tiny",
        "--steps",
        "4",
        "--batch-size",
        "16",
        "--num-workers",
        "0",
        "--log-every",
        "1",
        "--eval-every",
        "4",
        "--no-progress",
    ]
    result = torchrun(2, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # rank 0 writes, once per step
    assert np.isfinite([r["loss"] for r in rows if "loss" in r]).all()
    assert (run / "best" / "model.safetensors").exists()
    assert result.stdout.count("step=4 epoch=") == 1  # rank-0 logging only


def test_gradient_accumulation_matches_the_full_batch(digits_val_store, tmp_path):
    full = small(digits_val_store, tmp_path / "full", steps=3, batch_size=16, lr=1e-3)
    accum = dataclasses.replace(full, out=str(tmp_path / "accum"), micro_batch=8)  # 2 x 8 rows
    train_vae(full)
    train_vae(accum)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "accum")
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


def test_a_finished_run_is_extended_from_pre_decay(digits_val_store, tmp_path):
    run = tmp_path / "wsd"
    train_vae(small(digits_val_store, run, steps=10, warmup_steps=2, decay_steps=2, log_every=1))
    assert torch.load(run / "pre-decay" / "trainer.pt", weights_only=True)["state"]["step"] == 8
    finished = weights(run)
    longer = small(
        digits_val_store,
        run,
        steps=14,
        warmup_steps=2,
        decay_steps=2,
        log_every=1,
        resume_from=str(run / "pre-decay"),
    )
    train_vae(longer)
    kept = weights(run, "steps/0000010")  # the finished run's checkpoint survives the extension
    assert kept.keys() == finished.keys() and all(torch.equal(kept[k], finished[k]) for k in kept)
    assert (run / "steps" / "0000010" / "trainer.pt").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    extended = [r for r in rows if r["step"] > 8][-6:]
    assert [r["step"] for r in extended] == [9, 10, 11, 12, 13, 14]
    assert [r["lr"] for r in extended[:3]] == [1e-3, 1e-3, 1e-3]  # the stable phase goes on
    assert extended[-1]["lr"] < 1e-3  # then the new decay


def test_keep_every_leaves_step_numbered_checkpoints(digits_val_store, tmp_path):
    run = tmp_path / "keep"
    train_vae(small(digits_val_store, run, steps=6, keep_every=2, ckpt_every=100))
    assert sorted(p.name for p in (run / "steps").iterdir()) == ["0000002", "0000004", "0000006"]
    state = torch.load(run / "steps" / "0000004" / "trainer.pt", weights_only=True)
    assert state["state"]["step"] == 4
    final = weights(run)
    assert all(torch.equal(a, final[k]) for k, a in weights(run, "steps/0000006").items())
