"""Optimiser pieces shared by the trainers: weight-decay groups and the warmup-stable-decay schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on 2-D weight matrices only: not norms, biases, embeddings or learned tokens.

    Learned tokens and position embeddings are stored as (1, N, D) parameters, so `ndim == 2`
    selects exactly the Linear weights.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim == 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@dataclass(frozen=True)
class WSDSchedule:
    """Warmup-stable-decay (paper Appendix D, Table 6): linear warmup from `warmup_from` to
    `peak`, constant, then cosine decay to `final`. Phase lengths in optimiser steps."""

    peak: float = 1e-4
    warmup: int = 0
    stable: int = 0
    decay: int = 0
    warmup_from: float = 1e-6
    final: float = 1e-8

    @property
    def total(self) -> int:
        return self.warmup + self.stable + self.decay

    @property
    def decay_start(self) -> int:
        return self.warmup + self.stable

    def __call__(self, step: int) -> float:
        """Learning rate for optimiser step `step` (0-based)."""
        if step < self.warmup:
            return self.warmup_from + (self.peak - self.warmup_from) * step / self.warmup
        if step < self.decay_start or self.decay == 0:
            return self.peak
        progress = min(1.0, (step - self.decay_start) / self.decay)
        return self.final + 0.5 * (self.peak - self.final) * (1.0 + math.cos(math.pi * progress))


def wsd_from_epochs(
    epochs: int,
    steps_per_epoch: int,
    peak: float,
    warmup_epochs: int | None = None,
    decay_epochs: int | None = None,
) -> WSDSchedule:
    """The paper's phase split: 50 epochs -> 5/40/5, 150 -> 5/123/22; otherwise 10%/80%/10%."""
    table = {50: (5, 5), 150: (5, 22)}
    default_w, default_d = table.get(epochs, (max(1, epochs // 10), max(1, epochs // 10)))
    w = default_w if warmup_epochs is None else warmup_epochs
    d = default_d if decay_epochs is None else decay_epochs
    if w + d > epochs:
        w, d = 0, min(d, epochs)
    return WSDSchedule(
        peak=peak,
        warmup=w * steps_per_epoch,
        stable=(epochs - w - d) * steps_per_epoch,
        decay=d * steps_per_epoch,
    )


def make_schedule(cfg, steps_per_epoch: int) -> WSDSchedule:
    """The WSD schedule of a trainer config with steps/epochs, lr, warmup_steps and decay_steps:
    the paper's epoch phases with --epochs, else 10% warmup and 10% decay unless given."""
    if cfg.epochs is not None:  # epoch phases, then the step counts given, taken exactly
        base = wsd_from_epochs(cfg.epochs, steps_per_epoch, cfg.lr)
        warm = base.warmup if cfg.warmup_steps is None else min(cfg.warmup_steps, base.total)
        decay = base.decay if cfg.decay_steps is None else cfg.decay_steps
        decay = min(decay, base.total - warm)
        return WSDSchedule(peak=cfg.lr, warmup=warm, stable=base.total - warm - decay, decay=decay)
    total = cfg.steps or 0
    warm = total // 10 if cfg.warmup_steps is None else cfg.warmup_steps
    decay = total // 10 if cfg.decay_steps is None else cfg.decay_steps
    return WSDSchedule(peak=cfg.lr, warmup=warm, stable=max(0, total - warm - decay), decay=decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
