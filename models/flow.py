"""Flow matching on latents, the loss and the samplers side by side (after cloneofsimo/minRF).

Convention, stated once: t = 0 is noise x0 ~ N(0, I), t = 1 is data x1; x_t = (1 - t)·x0 + t·x1,
and the model predicts the velocity v = x1 - x0. Times are shifted toward noise with
t' = t / (κ - (κ - 1)·t), κ = 3 in training and sampling (paper §4.3).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .configs import CFG_INTERVAL  # noqa: F401 (the samplers' default, re-exported)


def sample_noise(seed: int, index: int, shape: tuple[int, ...]) -> np.ndarray:
    """The starting noise of sample `index`: float32 N(0, I) from its own stream, seeded by
    (seed, index) only, so it does not depend on the batch, the rank or the number of samples."""
    return np.random.default_rng([seed, index]).standard_normal(shape, dtype=np.float32)


def shift_time(t: torch.Tensor, kappa: float) -> torch.Tensor:
    """t' = t / (κ - (κ - 1) t): κ > 1 spends more time near the noise end (t' <= t)."""
    return t / (kappa - (kappa - 1.0) * t)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) for any rank of x."""
    return t.view(-1, *([1] * (x.dim() - 1)))


def sample_time(
    batch: int,
    device: torch.device,
    kappa: float,
    dist: str = "uniform",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """t ~ U(0, 1) (or logit-normal(0, 1)), then shifted by κ."""
    if dist == "logit-normal":
        t = torch.sigmoid(torch.randn(batch, device=device, generator=generator))
    else:
        t = torch.rand(batch, device=device, generator=generator)
    return shift_time(t, kappa)


def flow_loss(
    model: Callable,
    x1: torch.Tensor,
    y: torch.Tensor,
    kappa: float = 3.0,
    class_dropout: float = 0.1,
    null_class: int = 1000,
    time_dist: str = "uniform",
) -> torch.Tensor:
    """MSE between the predicted and the true velocity at a random time; labels dropped to null."""
    B = x1.shape[0]
    t = sample_time(B, x1.device, kappa, time_dist)
    x0 = torch.randn_like(x1)
    xt = (1 - _bcast(t, x1)) * x0 + _bcast(t, x1) * x1
    drop = torch.rand(B, device=x1.device) < class_dropout
    y = torch.where(drop, torch.full_like(y, null_class), y)
    v = model(xt, t, y)
    return F.mse_loss(v.float(), (x1 - x0).float())


SAMPLERS = ("euler", "heun")  # first order; second order (SiT's "heun2", EDM's Algorithm 1)


def _velocity_field(
    model: Callable,
    y: torch.Tensor,
    cfg: float,
    cfg_interval: tuple[float, float],
    null_class: int,
    autocast: torch.dtype | None,
    guide: Callable | None,
) -> Callable:
    """v(x, t, time): the guided velocity at state x and time t (a 0-dim tensor on x's device),
    `time` being t's host copy for the interval test. Every network call runs under autocast and
    returns float32."""
    null = torch.full_like(y, null_class)
    lo, hi = cfg_interval

    def net(m: Callable, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            return m(x, t, y).float()

    def velocity(x: torch.Tensor, t: torch.Tensor, time: float) -> torch.Tensor:
        tb = t.expand(x.shape[0])
        if cfg == 1.0 or not lo < time < hi:  # strictly inside, as the official sampler
            return net(model, x, tb, y)
        if guide is not None:  # AutoGuidance (Karras et al. 2024): both passes conditional
            v_weak = net(guide, x, tb, y)
            return v_weak + cfg * (net(model, x, tb, y) - v_weak)
        both = net(model, torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([y, null]))
        v_c, v_u = both.chunk(2)
        return v_u + cfg * (v_c - v_u)

    return velocity


@torch.no_grad()
def flow_sample(
    model: Callable,
    x0: torch.Tensor,
    y: torch.Tensor,
    steps: int = 50,
    kappa: float = 3.0,
    cfg: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    null_class: int = 1000,
    autocast: torch.dtype | None = None,
    sampler: str = "euler",
    guide: Callable | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = v from t = 0 (noise x0) to t = 1 on the κ-shifted grid t_0 .. t_steps.

    Args:
        sampler: "euler", x += dt·v(x, t_i); or "heun", the second-order step of SiT
            (transport/integrators.py, "heun2") and EDM (Karras et al. 2022, Algorithm 1):
            x' = x + dt·v(x, t_i), x += dt·(v(x, t_i) + v(x', t_i+1)) / 2, with a plain Euler
            last step, so t = 1 is never evaluated: 2·steps - 1 evaluations.
        cfg: the guidance weight w, applied only while the evaluation's own t is strictly inside
            `cfg_interval` (lo < t < hi, the official `decoder/sampling.py`: the t = 0 step of
            (0, 1) is unguided); w = 1 runs one pass per evaluation.
        guide: None: classifier-free guidance v_u + w·(v_c - v_u), the conditional and
            unconditional passes in one batch. A weaker model with the same signature:
            AutoGuidance v_weak + w·(v_main - v_weak), both conditional (no null class).
        autocast: e.g. torch.bfloat16: the networks run under autocast while the state x, the
            guidance combination and the time grid stay in float32.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    grid = shift_time(torch.linspace(0, 1, steps + 1, device=x0.device), kappa)
    times = grid.tolist()  # one host copy of the grid, not one sync per step
    velocity = _velocity_field(model, y, cfg, cfg_interval, null_class, autocast, guide)
    x = x0.float()
    for i in range(steps):
        dt = grid[i + 1] - grid[i]
        v = velocity(x, grid[i], times[i])
        if sampler == "heun" and i < steps - 1:
            v = 0.5 * (v + velocity(x + dt * v, grid[i + 1], times[i + 1]))
        x = x + dt * v
    return x


# `flow_sample` with the Euler sampler and classifier-free guidance (same arguments, no guide)
euler_sample = functools.partial(flow_sample, sampler="euler")


class LatentNorm(nn.Module):
    """Per-(token, dim) standardisation of latents (x - mean) / std, and its inverse for sampling.

    Saved with every DiT checkpoint (latent_stats.safetensors); mean 0 and std 1 when the run
    trained on raw latents, so the sampler can always call `denormalize`.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float().clone())  # (T, d)
        self.register_buffer("std", std.float().clamp_min(1e-6))  # (T, d)

    @classmethod
    def identity(cls, tokens: int, dim: int) -> LatentNorm:
        return cls(torch.zeros(tokens, dim), torch.ones(tokens, dim))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean
