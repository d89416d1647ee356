"""The FlatDINO VAE: 256 DINOv2 patches (P, C) <-> T one-dimensional latent tokens (T, d).

Paper §3.1 and Appendix C: a ViT encoder prepends T learnable tokens to the projected patches and
keeps only them, projected to mu and logvar; a ViT decoder projects the T latents up, adds a
learned position embedding, prepends P learnable query tokens and returns those projected to C.
Blocks are timm's pre-norm ViT blocks with LayerNorm, QK-norm and SwiGLU (hidden 4·D, as the
paper's public code). Pure nn.Module: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SwiGLU, trunc_normal_
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of one FlatDINO VAE (saved as config.json; rebuilds the model)."""

    in_dim: int = 768  # C: feature channels of the store
    num_patches: int = 256  # P: patches per image (a square grid)
    tokens: int = 32  # T: latent tokens
    latent_dim: int = 128  # d: channels per latent token
    enc_dim: int = 768  # encoder width (ViT-B)
    enc_depth: int = 12
    enc_heads: int = 12
    dec_dim: int = 1024  # decoder width (ViT-L)
    dec_depth: int = 24
    dec_heads: int = 16
    mlp_ratio: float = 4.0  # SwiGLU hidden = mlp_ratio · width
    logvar_init: float = -5.0  # initial logvar bias: small posterior noise while the decoder learns

    def to_dict(self) -> dict:
        return asdict(self)


VAE_PRESETS: dict[str, VAEConfig] = {
    "flatdino-32x128": VAEConfig(),  # the paper's model
    "flatdino-32x64": VAEConfig(latent_dim=64),
    "tiny": VAEConfig(
        tokens=8,
        latent_dim=16,
        enc_dim=64,
        enc_depth=2,
        enc_heads=2,
        dec_dim=64,
        dec_depth=2,
        dec_heads=2,
    ),  # fmt: skip
}


def vae_preset(name: str, **overrides) -> VAEConfig:
    """A registered preset with fields overridden (e.g. tokens, latent_dim, in_dim)."""
    return replace(VAE_PRESETS[name], **overrides)


def kl_weight(tokens: int, latent_dim: int) -> float:
    """β = 1e-6 · 512 / (T·d) (paper Table 4: 512 dims -> 1e-6, 4096 dims -> 1.25e-7)."""
    return 1e-6 * 512 / (tokens * latent_dim)


def sincos_2d(num_patches: int, dim: int) -> torch.Tensor:
    """(P, D) 2-D sin-cos position values of a square grid (MAE / timm layout)."""
    side = math.isqrt(num_patches)
    assert side * side == num_patches, f"{num_patches} patches are not a square grid"
    return build_sincos2d_pos_embed((side, side), dim=dim, temperature=10000.0)  # (P, D)


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.Sequential:
    return nn.Sequential(
        *[
            Block(
                dim,
                heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                qk_norm=True,
                act_layer=nn.SiLU,
                norm_layer=nn.LayerNorm,
                mlp_layer=SwiGLU,
            )
            for _ in range(depth)
        ]  # fmt: skip
    )


class FlatEncoder(nn.Module):
    """(B, P, C) patches -> mu, logvar (B, T, d)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_in = nn.Linear(cfg.in_dim, cfg.enc_dim)
        self.pos = nn.Parameter(sincos_2d(cfg.num_patches, cfg.enc_dim).unsqueeze(0))  # (1, P, D)
        self.latent_tokens = nn.Parameter(torch.randn(1, cfg.tokens, cfg.enc_dim))  # unit scale
        self.blocks = _blocks(cfg.enc_dim, cfg.enc_depth, cfg.enc_heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(cfg.enc_dim)
        self.to_moments = nn.Linear(cfg.enc_dim, 2 * cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, P, C = x.shape
        T = self.cfg.tokens
        h = self.patch_in(x) + self.pos  # (B, P, D)
        h = torch.cat([self.latent_tokens.expand(B, -1, -1), h], dim=1)  # (B, T + P, D)
        h = self.norm(self.blocks(h)[:, :T])  # (B, T, D)
        mu, logvar = self.to_moments(h).chunk(2, dim=-1)  # (B, T, d) each
        return mu, logvar


class FlatDecoder(nn.Module):
    """(B, T, d) latents -> (B, P, C) patches."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.latent_in = nn.Linear(cfg.latent_dim, cfg.dec_dim)
        self.latent_pos = nn.Parameter(torch.zeros(1, cfg.tokens, cfg.dec_dim))
        # Queries start from 2-D sin-cos values (then train): from 0.02-scale random queries the
        # tiny model sat on the predict-the-mean plateau (DESIGN.md, known facts).
        self.queries = nn.Parameter(sincos_2d(cfg.num_patches, cfg.dec_dim).unsqueeze(0))
        self.blocks = _blocks(cfg.dec_dim, cfg.dec_depth, cfg.dec_heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(cfg.dec_dim)
        self.out = nn.Linear(cfg.dec_dim, cfg.in_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, T, d = z.shape
        P = self.cfg.num_patches
        lat = self.latent_in(z) + self.latent_pos  # (B, T, D)
        h = torch.cat([self.queries.expand(B, -1, -1), lat], dim=1)  # (B, P + T, D)
        return self.out(self.norm(self.blocks(h)[:, :P]))  # (B, P, C)


class FlatDinoVAE(nn.Module):
    """Encoder + decoder; `encode`, `decode` and `forward` can be used alone."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = FlatEncoder(cfg)
        self.decoder = FlatDecoder(cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Every non-default init in one place."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Unit-scale latent path: mu ~ O(1) and the decoder sees the latents at the scale of its
        # sin-cos queries; with 0.02-scale projections the decoder ignores the latents and
        # predicts the mean (DESIGN.md, known facts).
        nn.init.xavier_uniform_(self.encoder.to_moments.weight)
        nn.init.xavier_uniform_(self.decoder.latent_in.weight)
        trunc_normal_(self.decoder.latent_pos, std=0.02)
        # logvar half of the moments: start with small posterior variance (exp(-5) ≈ 0.007)
        nn.init.constant_(self.encoder.to_moments.bias[self.cfg.latent_dim :], self.cfg.logvar_init)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P, C) -> mu, logvar (B, T, d)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, P, C)."""
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct x; reparameterised sample in training, mu in eval (or as `sample` says)."""
        mu, logvar = self.encode(x)
        sample = self.training if sample is None else sample
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
        return self.decode(z), mu, logvar


def vae_loss(
    x: torch.Tensor, x_hat: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float,
    recon: str = "mse", reduce_over: int | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Reconstruction (per element) + β · KL(q(z|x) || N(0, I)) (summed over T·d, per sample).

    `reduce_over`: divide per-sample sums by this many samples instead of the batch size, so that
    ranks with a short (or empty) tail batch contribute in proportion to their samples.
    """
    n = x.shape[0] if reduce_over is None else reduce_over
    x, x_hat, mu, logvar = x.float(), x_hat.float(), mu.float(), logvar.float()
    if recon == "mse":
        rec = F.mse_loss(x_hat, x, reduction="none")
    else:  # the paper's public code: Huber with delta 1
        rec = F.huber_loss(x_hat, x, reduction="none", delta=1.0)
    rec = rec.flatten(1).mean(1).sum() / max(n, 1)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    kl = kl.flatten(1).sum(1).sum() / max(n, 1)
    return {"loss": rec + beta * kl, "recon": rec, "kl": kl}


def build_on_meta(cfg: VAEConfig) -> FlatDinoVAE:
    """The model on the meta device: shapes and parameter counts without memory or init."""
    with torch.device("meta"):
        model = FlatDinoVAE.__new__(FlatDinoVAE)
        nn.Module.__init__(model)
        model.cfg = cfg
        model.encoder, model.decoder = FlatEncoder(cfg), FlatDecoder(cfg)
    return model


def count_parameters(cfg: VAEConfig) -> dict[str, int]:
    """Parameter counts of a preset (built on the meta device)."""
    model = build_on_meta(cfg)
    enc = sum(p.numel() for p in model.encoder.parameters())
    dec = sum(p.numel() for p in model.decoder.parameters())
    return {"encoder": enc, "decoder": dec, "total": enc + dec}
