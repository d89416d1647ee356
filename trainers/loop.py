"""The optimisation loop shared by the trainers (train-vae, train-dit, train-decoder).

One implementation of what every trainer does the same way: gradient accumulation (with DDP's
`no_sync` on the micro steps that do not update), autocast as --precision says (by default bf16
on CUDA, fp32 on CPU), the non-finite stop, gradient clipping, the learning-rate schedule, step
logging to metrics.jsonl and log.txt, periodic checkpoints, `--stop-after`, and an exact resume
position (epoch, micro step). What differs between trainers comes in through `LoopHooks`: the
batches, the loss, what happens after an update (EMA), what happens after a step (validation,
extra checkpoints) and how a checkpoint is written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from ..pipeline.env import autocast, inference_dtype
from ..pipeline.errors import FlatDinoError
from ..pipeline.loader import prefetch
from ..pipeline.options import flat_keywords
from .configs import RunConfig
from .optim import set_lr
from .runner import Dist, NonFiniteLossError, all_reduce_mean, append_metrics
from .tracking import Tracker

log = logging.getLogger("flatdino.train")


@flat_keywords  # LoopConfig("toy", total=2, log_every=1): the run's fields by name, as a trainer's
@dataclass(frozen=True)
class LoopConfig:
    """One loop: its label, its length and batch split, and the run's reporting and saving
    (`RunConfig`: grad_clip, log_every, ckpt_every, keep_every, stop_after, progress)."""

    name: str  # progress-bar label, e.g. "train-dit"
    total: int  # optimiser steps of the whole run
    accum: int = 1  # micro batches per optimiser step
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class LoopHooks:
    """The trainer-specific parts of the loop."""

    batches: Callable[[int, int], Iterable[Any]]  # (epoch, first micro step) -> micro batches
    loss: Callable[[nn.Module, Any], tuple[dict[str, torch.Tensor], int]]  # -> ({"loss", ...}, B)
    lr: Callable[[int], float]  # learning rate of optimiser step i (0-based)
    save: Callable[[Path], None]  # write a resumable checkpoint (weights, optimiser, state) there
    after_update: Callable[[], None] = lambda: None  # e.g. the EMA update
    after_step: Callable[[int], dict] = field(default=lambda step: {})  # -> extra metrics
    # steps at which after_step writes something (validation, best/, pre-decay/): the loop makes
    # sure no step so far was non-finite before it runs
    acts_at: Callable[[int], bool] = field(default=lambda step: False)


def autocast_for(device: torch.device, precision: str = "auto"):
    """The autocast of --precision (pipeline/env.py): auto is bf16 on CUDA and nothing (fp32) on
    CPU; bf16 autocasts on CPU too."""
    return autocast(inference_dtype(precision, device), device)


def _log_step(out: Path, d: Dist, metrics: dict, bar: tqdm, tracker: Tracker) -> None:
    append_metrics(out, metrics, d)
    tracker.scalars(metrics["step"], metrics)
    bar.set_postfix(loss=f"{metrics['loss']:.4f}")
    log.info(
        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    )


def _micro_step(net: nn.Module, batch, hooks: LoopHooks, lc: LoopConfig, d: Dist, sync: bool):
    ctx = net.no_sync() if (d.world > 1 and not sync) else nullcontext()
    with ctx, autocast_for(d.device, lc.run.precision):
        parts, n = hooks.loss(net, batch)
        (parts["loss"] / lc.accum).backward()
    return parts, n


def _check_finite(pending: list[tuple[int, torch.Tensor]], out: Path) -> None:
    """One host sync for all steps since the last check; stop at the first non-finite one."""
    if not pending:
        return
    flags = torch.stack([flag for _, flag in pending]).cpu().tolist()
    steps = [step for step, _ in pending]
    pending.clear()
    if any(flags):
        step = steps[flags.index(True)]
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {step}; the last good checkpoint in "
            f"{out / 'checkpoints'} is intact (try a lower --lr or --grad-clip)",
            step=step,
        )


def train_loop(
    lc: LoopConfig,
    d: Dist,
    out: Path,
    net: nn.Module,
    opt: torch.optim.Optimizer,
    hooks: LoopHooks,
    state: dict,
    tracker: Tracker | None = None,
) -> dict:
    """Run optimiser steps from state["step"] to the end (or --stop-after); returns the last metrics.

    `state` holds step, epoch and micro_step (the position inside the epoch) and is updated in
    place, so a checkpoint of it resumes exactly where this invocation stopped.
    """
    tracker = tracker or Tracker(out)
    params = [p for g in opt.param_groups for p in g["params"]]
    end = (
        lc.total if lc.run.stop_after is None else min(lc.total, state["step"] + lc.run.stop_after)
    )
    if state["step"] >= end:  # e.g. --resume of a finished run: keep its final.json as it is
        log.info("%s: at step %d of %d already; nothing to do", lc.name, state["step"], lc.total)
        return {"step": state["step"]}
    bar = tqdm(
        total=lc.total,
        initial=state["step"],
        unit="step",
        desc=lc.name,
        disable=not (lc.run.progress and d.main),
    )
    metrics: dict = {}
    tic, seen, summed = time.perf_counter(), 0, 0.0
    bad = torch.zeros((), dtype=torch.bool, device=d.device)  # a non-finite step since the start
    pending: list[tuple[int, torch.Tensor]] = []  # (step, bad so far) not yet looked at
    device_skip = getattr(opt, "_step_supports_amp_scaling", False)  # fused AdamW: found_inf
    while state["step"] < end:
        first_micro = state["micro_step"]
        # one batch ahead on a thread, pinned on CUDA: the host prepares step s+1 during step s
        stream = prefetch(hooks.batches(state["epoch"], first_micro), pin=d.device.type == "cuda")
        for batch in stream:
            sync = (state["micro_step"] + 1) % lc.accum == 0
            parts, n = _micro_step(net, batch, hooks, lc, d, sync)
            state["micro_step"] += 1
            seen += n
            # every part of every micro batch, so a NaN in any is seen and the logged parts are
            # means over the whole step (all micro batches, all ranks) like the loss
            names = list(parts)
            summed = summed + torch.stack([parts[k].detach().float() for k in names])
            if not sync:
                continue
            means, summed = all_reduce_mean(summed / lc.accum, d), 0.0  # one collective
            loss = means[names.index("loss")]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, lc.run.grad_clip or float("inf"))
            # Equal on every rank (loss and gradients are all-reduced). Once a step is bad, every
            # update is skipped on the device until the next check stops the run: the weights
            # stay those before the first bad step, without a host sync per step.
            bad = bad | ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
            pending.append((state["step"], bad))
            if not device_skip:  # this optimiser cannot skip on the device: check every step
                _check_finite(pending, out)
            else:
                opt.found_inf = bad.float()  # read by fused AdamW: no update where it is 1
            lr = hooks.lr(state["step"])
            set_lr(opt, lr)
            opt.step()
            opt.zero_grad(set_to_none=True)
            hooks.after_update()
            state["step"] += 1
            bar.update(1)
            step = state["step"]
            logs = step % lc.run.log_every == 0 or step in (lc.total, end)
            saves = step % lc.run.ckpt_every == 0 or step == end
            keeps = bool(lc.run.keep_every) and step % lc.run.keep_every == 0
            if logs or saves or keeps or hooks.acts_at(step):
                _check_finite(pending, out)  # the one host sync, before anything is written
            if logs:
                rate = seen * d.world / (time.perf_counter() - tic)
                values = dict(zip(names, means.tolist(), strict=True))
                metrics = {
                    "step": step,
                    "epoch": state["epoch"],
                    "loss": values.pop("loss"),
                    **values,
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "samples_per_s": rate,
                }
                _log_step(out, d, metrics, bar, tracker)
                tic, seen = time.perf_counter(), 0
            metrics.update(hooks.after_step(step))
            if saves:
                hooks.save(out / "checkpoints")
            if keeps:  # step-numbered, never overwritten: FID against steps, rolling back
                hooks.save(out / "steps" / f"{step:07d}")
            if step >= end:
                break
        else:  # the epoch ended; micro batches short of a whole step are dropped, not carried over
            if first_micro == state["micro_step"] == 0:
                raise FlatDinoError(
                    f"{lc.name}: an epoch holds no batch (no valid rows, or --batch-size larger "
                    "than the data); check the store with `flatdino info`"
                )
            if state["micro_step"] % lc.accum:
                opt.zero_grad(set_to_none=True)
                summed = 0.0
            state["epoch"] += 1
            state["micro_step"] = 0
        stream.close()  # the epoch was left early (the run's end): stop its producer
    bar.close()
    if d.main:
        (out / "final.json").write_text(json.dumps(metrics, indent=2))
    return metrics
