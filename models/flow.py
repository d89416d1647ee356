"""Flow matching on latents, the loss and the samplers side by side (after cloneofsimo/minRF).

Convention, stated once: t = 0 is noise x0 ~ N(0, I), t = 1 is data x1; x_t = (1 - t)·x0 + t·x1,
and the model predicts the velocity v = x1 - x0. Times are shifted toward noise with
t' = t / (κ - (κ - 1)·t), κ = 3 in training and sampling (paper §4.3).

A state is the latent tokens (B, T, d), or for a generator with a CLS token the pair (tokens,
cls (B, C)): both parts share each sample's t, are integrated and guided alike, and the loss is one
mean over all their elements (the official train_generator.py and decoder/sampling.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .configs import CFG_INTERVAL  # noqa: F401 (the samplers' default, re-exported)

State = torch.Tensor | tuple[torch.Tensor, ...]  # tokens, or (tokens, cls)


def sample_noise(seed: int, index: int, shape: tuple[int, ...], stream: int = 0) -> np.ndarray:
    """The starting noise of sample `index`: float32 N(0, I) from its own stream, seeded by
    (seed, index) only, so it does not depend on the batch, the rank or the number of samples.
    `stream` 1 is the CLS token's, independent of the latents' (stream 0)."""
    key = [seed, index, stream] if stream else [seed, index]
    return np.random.default_rng(key).standard_normal(shape, dtype=np.float32)


def smap(fn: Callable[..., torch.Tensor], *states: State) -> State:
    """fn applied part by part to states of the same form (tokens, or (tokens, cls))."""
    if isinstance(states[0], tuple):
        return tuple(fn(*parts) for parts in zip(*states, strict=True))
    return fn(*states)


def batch_size(x: State) -> int:
    """B of a state."""
    return (x[0] if isinstance(x, tuple) else x).shape[0]


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


def velocity_loss(
    model: Callable, x0: State, x1: State, t: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """MSE between the predicted and the true velocity x1 - x0 at x_t, time t (B,): with a CLS
    token one mean over every latent and CLS element together, as the official loss."""
    xt = smap(lambda a, b: (1 - _bcast(t, a)) * a + _bcast(t, a) * b, x0, x1)
    v = model(xt, t, y)
    if not isinstance(v, tuple):
        return F.mse_loss(v.float(), (x1 - x0).float())
    err = [(p.float() - (b - a).float()).square() for p, a, b in zip(v, x0, x1, strict=True)]
    return sum(e.sum() for e in err) / sum(e.numel() for e in err)


def flow_loss(
    model: Callable,
    x1: State,
    y: torch.Tensor,
    kappa: float = 3.0,
    class_dropout: float = 0.1,
    null_class: int = 1000,
    time_dist: str = "uniform",
) -> torch.Tensor:
    """`velocity_loss` at a random time from fresh noise; labels dropped to null. One t per
    sample, shared by the tokens and the CLS token."""
    B = batch_size(x1)
    device = (x1[0] if isinstance(x1, tuple) else x1).device
    t = sample_time(B, device, kappa, time_dist)
    x0 = smap(torch.randn_like, x1)
    drop = torch.rand(B, device=device) < class_dropout
    y = torch.where(drop, torch.full_like(y, null_class), y)
    return velocity_loss(model, x0, x1, t, y)


def _advance(x: State, dt: torch.Tensor, v: State) -> State:
    """x + dt·v, part by part."""
    return smap(lambda a, b: a + dt * b, x, v)


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

    def net(m: Callable, x: State, t: torch.Tensor, y: torch.Tensor) -> State:
        with torch.autocast(t.device.type, dtype=autocast, enabled=autocast is not None):
            return smap(lambda v: v.float(), m(x, t, y))

    def velocity(x: State, t: torch.Tensor, time: float) -> State:
        B = batch_size(x)
        tb = t.expand(B)
        if cfg == 1.0 or not lo < time < hi:  # strictly inside, as the official sampler
            return net(model, x, tb, y)
        if guide is not None:  # AutoGuidance (Karras et al. 2024): both passes conditional
            v_weak = net(guide, x, tb, y)
            return smap(lambda w, m: w + cfg * (m - w), v_weak, net(model, x, tb, y))
        xx = smap(lambda a: torch.cat([a, a]), x)
        both = net(model, xx, torch.cat([tb, tb]), torch.cat([y, null]))
        v_c, v_u = smap(lambda v: v[:B], both), smap(lambda v: v[B:], both)
        return smap(lambda u, c: u + cfg * (c - u), v_u, v_c)  # the CLS token guided too

    return velocity


@torch.no_grad()
def flow_sample(
    model: Callable,
    x0: State,
    y: torch.Tensor,
    steps: int = 50,
    kappa: float = 3.0,
    cfg: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    null_class: int = 1000,
    autocast: torch.dtype | None = None,
    sampler: str = "euler",
    guide: Callable | None = None,
) -> State:
    """Integrate dx/dt = v from t = 0 (noise x0) to t = 1 on the κ-shifted grid t_0 .. t_steps;
    x0 is the tokens' noise, or the pair (tokens, cls) for a generator with a CLS token.

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
    lead = x0[0] if isinstance(x0, tuple) else x0  # the tokens
    grid = shift_time(torch.linspace(0, 1, steps + 1, device=lead.device), kappa)
    times = grid.tolist()  # one host copy of the grid, not one sync per step
    velocity = _velocity_field(model, y, cfg, cfg_interval, null_class, autocast, guide)
    x = smap(lambda a: a.float(), x0)
    for i in range(steps):
        dt = grid[i + 1] - grid[i]
        v = velocity(x, grid[i], times[i])
        if sampler == "heun" and i < steps - 1:
            v_next = velocity(_advance(x, dt, v), grid[i + 1], times[i + 1])
            v = smap(lambda a, b: 0.5 * (a + b), v, v_next)
        x = _advance(x, dt, v)
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
