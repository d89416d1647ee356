"""The paths a GPU run takes first, run on CPU with the tiny presets: `--compile` (inductor, which
compiles C++ kernels with the system compiler), `--precision bf16` (autocast takes bfloat16 on CPU)
and fused AdamW's device-side skip of a non-finite step (torch has the fused kernel on CPU too; the
trainers take it on CUDA, and here through the internal `fused_adamw`).

Compiling dominates the time (about a minute per trainer on two cores, once per process: a second
model of the same class reuses the compiled code), so one test per trainer covers compile and resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import fake_latents_store
from flatdino.pipeline.errors import FlatDinoError
from flatdino.trainers import train_dit as td
from flatdino.trainers.run import TrainingRun
from flatdino.trainers.runner import NonFiniteLossError
from flatdino.trainers.train_decoder import TrainDecoderConfig, train_decoder
from flatdino.trainers.train_dit import TrainDiTConfig, train_dit
from flatdino.trainers.train_vae import TrainVAEConfig, train_vae

SHARED = dict(preset="tiny", batch_size=16, lr=1e-3, log_every=1, progress=False, device="cpu")


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    """64 images of 4 classes, (T, d) = (8, 16), two views."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 16)
    mu = rng.normal(size=(4, 8, 16))[labels][:, None] + 0.3 * rng.normal(size=(64, 2, 8, 16))
    return fake_latents_store(tmp_path_factory.mktemp("lat") / "l.zarr", mu.astype("f4"), labels)


def trainer(name: str, digits: Path, latents: Path, out: Path, **kw):
    """(train function, its config) for the tiny preset of trainer `name`."""
    run = dict(SHARED, out=str(out), steps=4, ckpt_every=100) | kw
    if name == "vae":
        cfg = TrainVAEConfig(features=str(digits), num_workers=0, shuffle_buffer=16, **run)
        return train_vae, cfg
    if name == "dit":
        return train_dit, TrainDiTConfig(latents=str(latents), sample_every=0, **run)
    return train_decoder, TrainDecoderConfig(
        features=str(digits), num_workers=0, grid_every=0, **run
    )


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def checkpoint(run: Path, name: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"{name}.safetensors"))


def optimiser(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "trainer.pt", weights_only=True)["optimizer"]


def differ(a: dict, b: dict) -> list[str]:
    """The keys whose tensors differ (all of them when the key sets do)."""
    if a.keys() != b.keys():
        return sorted(a.keys() ^ b.keys())
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("name", ["vae", "dit"])
def test_compiled_training_is_eager_within_1e_4_and_resumes_bit_identically(
    name, digits_val_store, latents, tmp_path, request
):
    # One thread: inductor's CPU kernel for the class embedding's backward (a scatter-add) runs
    # in parallel with atomic adds, so with 2 threads its sum order, and the last bits of
    # y_embed.weight, vary from run to run (as atomics do on CUDA).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))

    def train(out: str, **kw):  # fused AdamW, as a compiled run on CUDA takes it
        run, cfg = trainer(name, digits_val_store, latents, tmp_path / out, fused_adamw=True, **kw)
        run(cfg)

    train("eager")
    torch._dynamo.reset()  # compile here, whatever ran before in this process
    torch._dynamo.utils.counters.clear()
    train("compiled", compile=True)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1  # the model did go through dynamo
    assert not counters["graph_break"]  # one graph: nothing in the model falls back to Python
    train("split", compile=True, stop_after=2)
    train("split", compile=True, resume=True)

    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(compiled) == 4 and compiled == pytest.approx(eager, rel=1e-4, abs=0)
    assert losses(tmp_path / "split") == compiled  # the resumed invocation's rows follow on
    for part in ("model", "ema") if name == "dit" else ("model",):
        assert not differ(
            checkpoint(tmp_path / "compiled", part), checkpoint(tmp_path / "split", part)
        )
    a, b = optimiser(tmp_path / "compiled")["state"], optimiser(tmp_path / "split")["state"]
    assert a.keys() == b.keys() and not [i for i in a if differ(a[i], b[i])]


@pytest.mark.parametrize("name", ["vae", "dit", "decoder"])
def test_a_bf16_step_on_cpu_is_finite_and_close_to_fp32(name, digits_val_store, latents, tmp_path):
    out = {}
    for precision in ("fp32", "bf16", "auto"):
        run, cfg = trainer(
            name, digits_val_store, latents, tmp_path / precision, steps=2, precision=precision
        )
        run(cfg)
        out[precision] = losses(tmp_path / precision)
    fp32, bf16 = out["fp32"], out["bf16"]
    assert all(math.isfinite(x) for x in bf16)
    # autocast did run the networks in bf16 (the DiT's first loss is equal: its output layer
    # starts at zero), and the losses stay close: at most 2e-5 relative measured, 1e-3 allowed
    assert bf16 != fp32
    assert bf16 == pytest.approx(fp32, rel=1e-3)
    assert out["auto"] == fp32  # auto on CPU is today's fp32, exactly
    weights = checkpoint(tmp_path / "bf16")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


def test_an_unknown_precision_is_refused_before_the_run_folder(latents, tmp_path):
    run, cfg = trainer("dit", None, latents, tmp_path / "r", precision="fp16")
    with pytest.raises(FlatDinoError, match="--precision must be one of auto, bf16, fp32"):
        run(cfg)
    assert not (tmp_path / "r").exists()


def test_fused_adamw_skips_a_non_finite_step_on_the_device(latents, tmp_path, monkeypatch):
    """The trainers' own optimiser (fused AdamW, CUDA's choice, asked for on CPU) and loop: step 2's loss is NaN, and the
    host looks only at the checkpoint of step 4. Steps 2 and 3 ran on the device but changed no
    weight and no optimiser state (moments, step counts); the run stops with the last checkpoint
    (step 2) intact, and resuming it continues to the same weights as a run that never saw NaN."""
    runs: list[TrainingRun] = []
    build = TrainingRun.build

    def keep(self, *args, **kwargs):
        runs.append(self)
        return build(self, *args, **kwargs)

    real, calls = td.flow_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 3 else value  # step 2 (0-based)

    kw = dict(steps=6, ckpt_every=2, log_every=100, fused_adamw=True)  # CUDA's choice, on CPU
    clean, cfg = tmp_path / "clean", trainer("dit", None, latents, tmp_path / "clean", **kw)[1]
    train_dit(cfg)
    monkeypatch.setattr(TrainingRun, "build", keep)
    monkeypatch.setattr(td, "flow_loss", poisoned)
    run = tmp_path / "nan"
    cfg = trainer("dit", None, latents, run, **kw)[1]
    with pytest.raises(NonFiniteLossError, match="at step 2") as e:
        train_dit(cfg)
    assert e.value.step == 2 and calls["n"] == 4  # steps 2 and 3 ran before the host looked
    live = runs[-1]
    assert live.opt.defaults["fused"] and live.state["step"] == 4
    saved = optimiser(run)
    assert torch.load(run / "checkpoints" / "trainer.pt", weights_only=True)["state"]["step"] == 2
    assert not differ(live.model.state_dict(), checkpoint(run))  # no weight moved after step 2
    state = live.opt.state_dict()["state"]
    assert state.keys() == saved["state"].keys()
    assert not [i for i in state if differ(state[i], saved["state"][i])]
    assert all(float(s["step"]) == 2 for s in state.values())  # the skipped steps are not counted
    monkeypatch.undo()
    train_dit(dataclasses.replace(cfg, resume=True))
    assert differ(checkpoint(run), live.model.state_dict())  # the later steps updated
    for part in ("model", "ema"):
        assert not differ(checkpoint(run, part), checkpoint(clean, part)), part
