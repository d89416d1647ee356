"""The shared training loop and runner: non-finite stops, final metrics, refused resumes, and a
checkpoint swap interrupted by a kill."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flatdino.pipeline.errors import FlatDinoError
from flatdino.trainers.loop import LoopConfig, LoopHooks, train_loop
from flatdino.trainers.resume import resume_run
from flatdino.trainers.runner import (
    Dist,
    NonFiniteLossError,
    run_setup,
    save_checkpoint,
    trainer_state,
)

D = Dist()


def toy(out: Path, losses: list[float] | None = None, **loop):
    """A 2-parameter model whose k-th micro-batch loss is multiplied by losses[k] (NaN to poison)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"step": 0, "micro_step": 0, "epoch": 0}
    calls = {"n": 0}
    setup = run_setup(4, 2, 0, D)

    def loss(net, batch):
        scale = losses[calls["n"]] if losses and calls["n"] < len(losses) else 1.0
        calls["n"] += 1
        return {"loss": net(batch).pow(2).mean() * scale}, len(batch)

    def save(path):
        save_checkpoint(path, model, {"toy": 1}, trainer_state(opt, state, D, setup), D)

    hooks = LoopHooks(
        batches=lambda e, s: [torch.ones(2, 2)] * (4 - s), loss=loss, lr=lambda i: 0.1, save=save
    )
    cfg = LoopConfig(
        "toy", **{"total": 6, "log_every": 100, "ckpt_every": 2, "progress": False, **loop}
    )
    out.mkdir(exist_ok=True)
    return model, opt, state, setup, lambda: train_loop(cfg, D, out, model, opt, hooks, state)


def test_nan_in_an_early_micro_batch_stops_before_the_update(tmp_path):
    model, _, _, _, run = toy(tmp_path, losses=[1, 1, 1, 1, float("nan"), 1], accum=2)
    with pytest.raises(NonFiniteLossError, match="step 2"):
        run()  # micro batch 5 is the first of step 3's two
    saved = torch.load(tmp_path / "checkpoints" / "trainer.pt", weights_only=True)["state"]
    assert saved["step"] == 2 and all(torch.isfinite(p).all() for p in model.parameters())


def test_stop_after_writes_the_last_steps_metrics(tmp_path):
    _, _, _, _, run = toy(tmp_path, stop_after=3)
    metrics = run()
    assert metrics["step"] == 3 and "loss" in metrics  # logged although 3 % log_every != 0
    assert json.loads((tmp_path / "final.json").read_text())["step"] == 3


def test_resume_refuses_another_setup_and_survives_an_interrupted_swap(tmp_path):
    model, opt, _, setup, run = toy(tmp_path, stop_after=3)
    run()
    state = {"step": 0, "micro_step": 0, "epoch": 0}
    with pytest.raises(FlatDinoError, match="batch_size 4 \\(now 8\\)"):
        resume_run(None, tmp_path, model, {"toy": 1}, opt, state, D, {**setup, "batch_size": 8})
    # killed between the two renames of a save: checkpoints/ is gone, .checkpoints.old is not
    shutil.move(tmp_path / "checkpoints", tmp_path / ".checkpoints.old")
    resume_run(None, tmp_path, model, {"toy": 1}, opt, state, D, setup)
    assert state["step"] == 3


def test_micro_batches_short_of_a_step_at_epoch_end_are_dropped(tmp_path):
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    state = {"step": 0, "micro_step": 0, "epoch": 0}
    hooks = LoopHooks(
        batches=lambda e, s: [torch.ones(1, 1)] * (3 - s),  # 3 micro batches per epoch
        loss=lambda net, x: ({"loss": net(x).mean()}, 1),  # d loss / d w = 1 per micro batch
        lr=lambda i: 1.0,
        save=lambda path: None,
    )
    cfg = LoopConfig("toy", total=3, accum=2, grad_clip=0, ckpt_every=100, progress=False)
    train_loop(cfg, D, tmp_path, model, opt, hooks, state)
    assert model.weight.item() == -3.0  # three steps of mean gradient 1; a carried-over half: -3.5


def test_an_epoch_without_batches_is_an_error_not_a_hang(tmp_path):
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = LoopHooks(batches=lambda e, s: [], loss=None, lr=lambda i: 0.1, save=lambda p: None)
    cfg = LoopConfig("toy", total=2, progress=False)
    with pytest.raises(FlatDinoError, match="no batch"):
        train_loop(cfg, D, tmp_path, model, opt, hooks, {"step": 0, "micro_step": 0, "epoch": 0})


def fused_toy(out: Path, total: int, nan_at: int | None = None, log_every: int = 100):
    """A fused-AdamW model (skips non-finite steps on the device) run for `total` steps."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    calls = {"n": 0}

    def loss(net, batch):
        scale = float("nan") if calls["n"] == nan_at else 1.0
        calls["n"] += 1
        return {"loss": net(batch).pow(2).mean() * scale}, len(batch)

    hooks = LoopHooks(
        batches=lambda e, s: [torch.ones(2, 2)] * (100 - s),
        loss=loss,
        lr=lambda i: 0.1,
        save=lambda path: None,
    )
    cfg = LoopConfig("toy", total=total, log_every=log_every, ckpt_every=1000, progress=False)
    out.mkdir(exist_ok=True)
    state = {"step": 0, "micro_step": 0, "epoch": 0}
    return model, lambda: train_loop(cfg, D, out, model, opt, hooks, state)


def test_no_host_sync_between_log_steps(tmp_path, monkeypatch):
    """Before: two syncs per step (`if isfinite(loss) and isfinite(grad_norm)`); now only at log
    and checkpoint steps, whatever the run length."""
    counts = []
    for total in (4, 12):
        count = {"n": 0}
        for name in ("item", "tolist", "__bool__", "__float__"):
            real = getattr(torch.Tensor, name)

            def counted(self, *a, _real=real, _count=count, **k):
                _count["n"] += 1
                return _real(self, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)
        _, run = fused_toy(tmp_path / f"r{total}", total)
        run()
        monkeypatch.undo()
        counts.append(count["n"])
    assert counts[0] == counts[1]


def test_a_non_finite_step_never_reaches_the_weights_without_a_per_step_check(tmp_path):
    reference, run = fused_toy(tmp_path / "ref", total=2)
    run()
    model, run = fused_toy(tmp_path / "nan", total=6, nan_at=2)  # checked only at the end
    with pytest.raises(NonFiniteLossError, match="at step 2") as e:
        run()
    assert e.value.step == 2
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)  # steps 2..5 were skipped on the device
