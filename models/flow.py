"""Flow matching on latents, the loss and the sampler side by side (after cloneofsimo/minRF).

Convention, stated once: t = 0 is noise x0 ~ N(0, I), t = 1 is data x1; x_t = (1 - t)·x0 + t·x1,
and the model predicts the velocity v = x1 - x0. Times are shifted toward noise with
t' = t / (κ - (κ - 1)·t), κ = 3 in training and sampling (paper §4.3).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def shift_time(t: torch.Tensor, kappa: float) -> torch.Tensor:
    """t' = t / (κ - (κ - 1) t): κ > 1 spends more time near the noise end (t' <= t)."""
    return t / (kappa - (kappa - 1.0) * t)


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) for any rank of x."""
    return t.view(-1, *([1] * (x.dim() - 1)))


def sample_time(batch: int, device: torch.device, kappa: float, dist: str = "uniform",
                generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """t ~ U(0, 1) (or logit-normal(0, 1)), then shifted by κ."""
    if dist == "logit-normal":
        t = torch.sigmoid(torch.randn(batch, device=device, generator=generator))
    else:
        t = torch.rand(batch, device=device, generator=generator)
    return shift_time(t, kappa)


def flow_loss(
    model: Callable, x1: torch.Tensor, y: torch.Tensor, kappa: float = 3.0, class_dropout: float = 0.1,
    null_class: int = 1000, time_dist: str = "uniform",
) -> torch.Tensor:  # fmt: skip
    """MSE between the predicted and the true velocity at a random time; labels dropped to null."""
    B = x1.shape[0]
    t = sample_time(B, x1.device, kappa, time_dist)
    x0 = torch.randn_like(x1)
    xt = (1 - _bcast(t, x1)) * x0 + _bcast(t, x1) * x1
    drop = torch.rand(B, device=x1.device) < class_dropout
    y = torch.where(drop, torch.full_like(y, null_class), y)
    v = model(xt, t, y)
    return F.mse_loss(v.float(), (x1 - x0).float())


@torch.no_grad()
def euler_sample(
    model: Callable, x0: torch.Tensor, y: torch.Tensor, steps: int = 50, kappa: float = 3.0,
    cfg: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0), null_class: int = 1000,
    autocast: torch.dtype | None = None,
) -> torch.Tensor:  # fmt: skip
    """Integrate dx/dt = v from t = 0 (noise x0) to t = 1 on the κ-shifted grid.

    Classifier-free guidance v_u + w·(v_c - v_u) is applied only while t is inside `cfg_interval`,
    with the conditional and unconditional passes in one batch; w = 1 skips the unconditional pass.
    With `autocast` (e.g. torch.bfloat16) the network runs under autocast while the state x, the
    guidance combination and the time grid stay in float32.
    """
    grid = shift_time(torch.linspace(0, 1, steps + 1, device=x0.device), kappa)
    times = grid.tolist()  # one host copy of the grid, not one sync per step
    x = x0.float()
    null = torch.full_like(y, null_class)

    def velocity(x, t, y):
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            return model(x, t, y).float()

    for i in range(steps):
        t, dt = grid[i], grid[i + 1] - grid[i]
        tb = t.expand(x.shape[0])
        if cfg != 1.0 and cfg_interval[0] <= times[i] <= cfg_interval[1]:
            v_c, v_u = velocity(torch.cat([x, x]), torch.cat([tb, tb]), torch.cat([y, null])).chunk(
                2
            )
            v = v_u + cfg * (v_c - v_u)
        else:
            v = velocity(x, tb, y)
        x = x + dt * v
    return x


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
