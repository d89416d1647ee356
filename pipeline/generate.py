"""The generation chain, written once: noise -> latents (the DiT's flow) -> DINOv2 features (the
VAE's decoder) -> pixels (the pixel decoder). `flatdino sample`, `flatdino sweep-cfg` and
train-dit's sample monitor all run it; sampling/bundle.py builds its networks from run folders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..models.flow import LatentNorm, flow_sample, sample_noise
from .env import autocast


@dataclass
class Generator:
    """The networks of the chain, on one device."""

    dit: torch.nn.Module  # the flow's velocity network (its null class is the last label)
    norm: LatentNorm  # the DiT's latent normalisation, undone before the VAE
    vae: torch.nn.Module  # the VAE the latents came from: latents -> features
    kappa: float  # the time shift the DiT was trained with (flow.json)
    decoder: torch.nn.Module | None = None  # features -> pixels; None: features only
    guide: torch.nn.Module | None = None  # AutoGuidance's weaker DiT; None: classifier-free

    def to(self, device: torch.device) -> Generator:
        for m in (self.dit, self.norm, self.vae, self.decoder, self.guide):
            if m is not None:
                m.to(device)
        return self


@dataclass(frozen=True)
class Guidance:
    """How the chain integrates the flow and guides it (see `flow_sample`)."""

    steps: int = 50  # sampler steps on the κ-shifted grid
    cfg: float = 1.0  # guidance weight w; 1: one pass per evaluation
    interval: tuple[float, float] = (0.0, 1.0)  # guided only for t strictly inside it
    sampler: str = "euler"  # euler | heun


@dataclass
class Generated:
    """One batch through the chain."""

    latents: torch.Tensor  # (B, T, d) in the VAE's latent space
    features: torch.Tensor  # (B, P, C) float32
    pixels: torch.Tensor | None  # (B, 3, H, W) in [0, 1], with a decoder


def noise(seed: int, rows: Sequence[int], shape: tuple[int, ...]) -> np.ndarray:
    """The starting noise of samples `rows`, (len(rows), *shape): each sample's own stream."""
    return np.stack([sample_noise(seed, i, shape) for i in rows])


@torch.no_grad()
def generate(
    gen: Generator,
    x0: torch.Tensor,
    y: torch.Tensor,
    guidance: Guidance,
    dtype: torch.dtype | None = None,
    pixels: bool = True,
) -> Generated:
    """Noise x0 (B, T, d) and labels y (B,) on the networks' device -> latents -> features ->
    pixels (with a decoder, unless `pixels` is False). The networks run under autocast `dtype`
    (None: fp32); the sampler's state stays fp32."""
    x1 = flow_sample(
        gen.dit,
        x0,
        y,
        guidance.steps,
        gen.kappa,
        guidance.cfg,
        guidance.interval,
        gen.dit.null_class,
        autocast=dtype,
        sampler=guidance.sampler,
        guide=gen.guide,
    )
    z = gen.norm.denormalize(x1)  # (B, T, d) in the VAE's latent space
    with autocast(dtype, x0.device):
        feats = gen.vae.decode(z).float()  # (B, P, C)
        decode = pixels and gen.decoder is not None
        img = gen.decoder(feats).float().clamp(0, 1) if decode else None  # (B, 3, H, W)
    return Generated(z, feats, img)
