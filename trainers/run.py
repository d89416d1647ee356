"""The set-up every trainer shares: one `TrainingRun` from a config, a model and a loop.

A trainer is its config, its model, its loss and its batches; everything else is here, in this
order (the order matters for exact resume and for identical runs):

    d = setup_distributed(cfg.run.device, cfg.run.dist_timeout)   the group (before the checks)
    with start_run(cfg, model_config, d) as run:   batch split, run folder, log.txt, RNG scope
        model = run.build(make_model, ...)     seeded init, AdamW, per-rank RNG, resume, DDP
        run.loop(name, total, hooks)           the shared loop (trainers/loop.py)

RNG: a trainer draws its noise, times and dropout from torch's global generator, seeded here (the
model init with `seed`, then `seed * world + rank` per rank, as DiT's train.py) and saved in every
checkpoint. `start_run` forks the generator for the run and restores the caller's afterwards, so
calling a trainer from Python does not reseed the caller's generator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..pipeline.env import inference_dtype
from ..pipeline.lock import writer_lock
from ..pipeline.options import flat_dict
from .loop import LoopConfig, LoopHooks, train_loop
from .optim import param_groups
from .resume import keep_finished, resume_run
from .runner import (
    Dist,
    append_metrics,
    run_setup,
    save_checkpoint,
    seed_ranks,
    setup_run_dir,
    split_batch,
    teardown_distributed,
    trainer_state,
    wrap_model,
)
from .tracking import Tracker, open_tracker, resolve_log_to
from .waits import bounded_waits

log = logging.getLogger("flatdino.train")


@dataclass
class TrainingRun:
    """One invocation of a trainer: where it writes, how its batch splits, what it trains."""

    cfg: Any  # the trainer's frozen config (TrainVAEConfig, ...), its shared fields in cfg.run
    d: Dist
    out: Path
    micro: int  # per-device micro batch
    accum: int  # micro batches per optimiser step
    model_config: dict  # config.json of the model, checked on resume
    model: nn.Module | None = None
    net: nn.Module | None = None  # what the loop calls: DDP and torch.compile around `model`
    opt: torch.optim.Optimizer | None = None
    state: dict = field(default_factory=dict)  # loop position (+ trainer fields, e.g. best)
    setup: dict = field(default_factory=dict)  # what the position depends on (run_setup)
    # saved beside model.safetensors in every checkpoint: {"ema": module}, {"flow": {...}}
    extra_weights: dict[str, nn.Module] = field(default_factory=dict)
    extra_json: dict[str, dict] = field(default_factory=dict)
    _tracker: Tracker | None = None

    @property
    def tracker(self) -> Tracker:
        """TensorBoard / W&B / none as --log-to says (rank 0), opened after the resume so a
        resumed run continues its curves from its step."""
        if self._tracker is None:
            config = {"train": flat_dict(self.cfg), "model": self.model_config}
            self._tracker = open_tracker(
                self.cfg.run.log_to,
                self.out,
                config,
                self.state.get("step", 0),
                self.d.main,
            )
        return self._tracker

    def record(self, row: dict) -> None:
        """One metrics row (with its "step") into metrics.jsonl and the tracker."""
        append_metrics(self.out, row, self.d)
        self.tracker.scalars(row["step"], row)

    def image(self, tag: str, image) -> None:
        """A uint8 (H, W, 3) picture of this step into the tracker and RUN/grids/."""
        self.tracker.image(tag, self.state["step"], image)

    @property
    def resuming(self) -> bool:
        return bool(self.cfg.run.resume or getattr(self.cfg, "resume_from", None))

    def build(
        self,
        make_model: Callable[[], nn.Module],
        state: dict | None = None,
        extras: Callable[[nn.Module], dict[str, nn.Module]] | None = None,
    ) -> nn.Module:
        """Seeded model, AdamW, per-rank RNG, resume, DDP; returns the (unwrapped) model.

        `extras(model)` builds modules that live beside the model and resume with it (the EMA)."""
        cfg, run, d = self.cfg, self.cfg.run, self.d
        torch.manual_seed(run.seed)  # identical init on every rank
        self.model = model = make_model().to(d.device)
        resumed = extras(model) if extras else {}
        self.extra_weights.update(resumed)
        groups = param_groups(model, run.weight_decay)
        # fused on CUDA: one kernel per step, and it skips a non-finite step on the device, so the
        # loop needs no host sync per step (loop.py). On CPU a sync costs nothing
        # (bench/host_sync.py: same samples/s) and the plain AdamW keeps CPU runs numerically as
        # they were; torch has the fused kernel on CPU too, which the tests take (`fused_adamw`).
        fused = d.device.type == "cuda" if run.fused_adamw is None else run.fused_adamw
        self.opt = torch.optim.AdamW(groups, lr=run.lr, betas=run.betas, fused=fused)
        self.state = {"step": 0, "micro_step": 0, "epoch": 0, **(state or {})}
        self.setup = run_setup(run.batch_size, self.micro, run.seed, d)
        seed_ranks(run.seed, d)
        if self.resuming:
            resume_from = getattr(cfg, "resume_from", None)  # train-vae only
            if resume_from:
                keep_finished(self.out, Path(resume_from), d)
            resume_run(
                resume_from,
                self.out,
                model,
                self.model_config,
                self.opt,
                self.state,
                d,
                self.setup,
                resumed,
            )
        self.net = wrap_model(model, d, run.compile)
        return model

    def save(self, path: Path) -> None:
        """A resumable checkpoint: weights (+ extras), config.json, trainer.pt."""
        state = trainer_state(self.opt, self.state, self.d, self.setup)
        save_checkpoint(
            path, self.model, self.model_config, state, self.d, self.extra_weights, self.extra_json
        )

    def save_weights(self, path: Path) -> None:
        """Weights and config.json only (best/): what a downstream stage loads."""
        save_checkpoint(path, self.model, self.model_config, None, self.d)

    def loop(self, name: str, total: int, hooks: LoopHooks) -> dict:
        """Run the shared loop to `total` optimiser steps; returns the last metrics."""
        lc = LoopConfig(name, total, self.accum, self.cfg.run)
        tracker = self.tracker
        try:
            return train_loop(lc, self.d, self.out, self.net, self.opt, hooks, self.state, tracker)
        finally:
            tracker.close()
            self._tracker = None


@contextmanager
def start_run(cfg: Any, model_config: dict, d: Dist) -> Iterator[TrainingRun]:
    """The batch split (checked before anything is written), the run folder's writer lock (rank 0,
    `pipeline.lock`), the run folder with config.json, rank 0's log lines into RUN/log.txt, and a
    forked RNG for the run's duration; a rank that does not answer within --dist-timeout is named
    in one line; the torchrun group is left at the end."""
    micro, accum = split_batch(cfg.run.batch_size, cfg.run.micro_batch, d)
    resolve_log_to(cfg.run.log_to)  # a missing package: before anything is written
    inference_dtype(cfg.run.precision, d.device)  # an unknown --precision, likewise
    out = Path(cfg.out)
    run = TrainingRun(cfg, d, out, micro, accum, model_config)
    cuda = [d.device.index or 0] if d.device.type == "cuda" else []
    fix = "the same command with --resume continues from the last checkpoint"
    # rank 0 writes the run folder, so it alone holds the folder's lock: the ranks of one job never
    # refuse each other, and a second job is refused before it writes anything
    with writer_lock(out, f"run folder {str(out)!r}", enabled=d.main):
        setup_run_dir(out, {"train": flat_dict(cfg), "model": model_config}, d, run.resuming)
        try:
            waits = bounded_waits(d, f"run {out}", fix)
            with run_log(out, d), torch.random.fork_rng(devices=cuda), waits:
                yield run
        finally:
            teardown_distributed(d)


@contextmanager
def run_log(out: Path, d: Dist) -> Iterator[None]:
    """While the run lasts, rank 0 logs flatdino's INFO lines, and RUN/log.txt receives what the
    process prints (a handler on the root logger); other ranks log warnings only. Where the lines
    print is the caller's choice: the CLI sends them to stdout."""
    ours, root = logging.getLogger("flatdino"), logging.getLogger()
    level = ours.level
    ours.setLevel(logging.INFO if d.main else logging.WARNING)
    handler = logging.FileHandler(out / "log.txt") if d.main else None
    if handler:
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    try:
        yield
    finally:
        if handler:
            root.removeHandler(handler)
            handler.close()
        ours.setLevel(level)
