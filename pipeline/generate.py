"""The generation chain, written once: noise -> latents (the DiT's flow) -> DINOv2 features (the
VAE's decoder) -> pixels (the pixel decoder). `flatdino sample`, `flatdino sweep-cfg` and
train-dit's sample monitor all run it; sampling/bundle.py builds its networks from run folders.

A generator with a CLS token (cls_dim) integrates the pair (tokens, cls) from the pair of noises
`start_noise` draws; the sampled CLS token is returned beside the latents and plays no part in the
features or pixels (the official gFID scripts drop it too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..models.configs import DiTConfig, DiTDHConfig
from ..models.flow import LatentNorm, State, flow_sample, sample_noise
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
    cls: torch.Tensor | None = None  # (B, C) float32, the sampled CLS token (not normalised)


def noise(seed: int, rows: Sequence[int], shape: tuple[int, ...], stream: int = 0) -> np.ndarray:
    """The starting noise of samples `rows`, (len(rows), *shape): each sample's own stream."""
    return np.stack([sample_noise(seed, i, shape, stream) for i in rows])


def start_noise(
    seed: int,
    rows: Sequence[int],
    dit_cfg: DiTConfig | DiTDHConfig,
    device: torch.device | None = None,
) -> State:
    """The sampler's starting state for samples `rows` of a generator with config `dit_cfg`: the
    tokens' noise (B, T, d), and with a CLS token the pair with its noise (B, C) (stream 1), so
    the tokens' noise is the same with or without the token."""
    x0 = torch.from_numpy(noise(seed, rows, (dit_cfg.tokens, dit_cfg.latent_dim))).to(device)
    if not dit_cfg.cls_dim:
        return x0
    return x0, torch.from_numpy(noise(seed, rows, (dit_cfg.cls_dim,), stream=1)).to(device)


@torch.no_grad()
def generate(
    gen: Generator,
    x0: torch.Tensor,
    y: torch.Tensor,
    guidance: Guidance,
    dtype: torch.dtype | None = None,
    pixels: bool = True,
) -> Generated:
    """Noise x0 (B, T, d) (the pair `start_noise` gives for a CLS generator) and labels y (B,) on
    the networks' device -> latents -> features -> pixels (with a decoder, unless `pixels` is
    False). The networks run under autocast `dtype` (None: fp32); the sampler's state stays
    fp32."""
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
    x1, cls = x1 if isinstance(x1, tuple) else (x1, None)
    z = gen.norm.denormalize(x1)  # (B, T, d) in the VAE's latent space
    with autocast(dtype, z.device):
        feats = gen.vae.decode(z).float()  # (B, P, C)
        decode = pixels and gen.decoder is not None
        img = gen.decoder(feats).float().clamp(0, 1) if decode else None  # (B, 3, H, W)
    return Generated(z, feats, img, cls)
