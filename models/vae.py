"""The FlatDINO VAE: 256 DINOv2 patches (P, C) <-> T one-dimensional latent tokens (T, d).

The official model (noctrog/flatdino: `autoencoder.py`, `models/vit.py`, `models/transformer.py`),
tensor for tensor. Encoder: a bias-free projection C -> D (none when C = D), T learnable tokens
prepended to the patches (no position embedding on the patches), pre-norm ViT blocks, a final LayerNorm, a
bias-free projection D -> 2d of the T tokens, split into mu | logvar. Decoder: a bias-free
projection d -> D plus a learned position embedding on the T latents, P learnable query tokens
prepended ([P queries, T latents]), blocks, LayerNorm, a bias-free projection D -> C of the first P
outputs. Blocks are timm's with LayerNorm eps 1e-6, qkv and output projections with bias, SwiGLU
with bias (hidden mlp_ratio·D) and a QK-norm that is a LayerNorm over the head dim with a scale
and no bias, shared by the heads. Pure nn.Module: no I/O.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SwiGLU, trunc_normal_tf_
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block

from .configs import VAE_PRESETS as VAE_PRESETS
from .configs import VAEConfig as VAEConfig
from .configs import vae_preset as vae_preset

EPS = 1e-6  # every LayerNorm of the official model


def kl_weight(tokens: int, latent_dim: int) -> float:
    """β = 1e-6 · 512 / (T·d) (paper Table 4: 512 dims -> 1e-6, 4096 dims -> 1.25e-7)."""
    return 1e-6 * 512 / (tokens * latent_dim)


def sincos_2d(num_patches: int, dim: int) -> torch.Tensor:
    """(P, D) 2-D sin-cos position values of a square grid (MAE / timm layout)."""
    side = math.isqrt(num_patches)
    assert side * side == num_patches, f"{num_patches} patches are not a square grid"
    return build_sincos2d_pos_embed((side, side), dim=dim, temperature=10000.0)  # (P, D)


def _proj(dim_in: int, dim_out: int) -> nn.Module:
    """The official bias-free projection, which exists only where the widths differ (the paper's
    encoder takes the 768 channels at width 768 without one)."""
    return nn.Linear(dim_in, dim_out, bias=False) if dim_in != dim_out else nn.Identity()


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.Sequential:
    """timm blocks as the official ones: LayerNorm eps 1e-6, bias-free QK-norm over the head dim."""
    blocks = nn.Sequential(
        *[
            Block(
                dim,
                heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                qk_norm=True,
                act_layer=nn.SiLU,
                norm_layer=partial(nn.LayerNorm, eps=EPS),
                mlp_layer=SwiGLU,
            )
            for _ in range(depth)
        ]
    )
    for block in blocks:
        block.attn.q_norm = nn.LayerNorm(dim // heads, eps=EPS, bias=False)
        block.attn.k_norm = nn.LayerNorm(dim // heads, eps=EPS, bias=False)
    return blocks


class FlatEncoder(nn.Module):
    """(B, P, C) patches -> mu, logvar (B, T, d)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.input_proj = _proj(cfg.in_dim, cfg.enc_dim)
        self.latent_tokens = nn.Parameter(torch.zeros(1, cfg.tokens, cfg.enc_dim))
        self.blocks = _blocks(cfg.enc_dim, cfg.enc_depth, cfg.enc_heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(cfg.enc_dim, eps=EPS)
        self.output_proj = _proj(cfg.enc_dim, 2 * cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, P, C = x.shape
        T = self.cfg.tokens
        h = self.input_proj(x)  # (B, P, D)
        h = torch.cat([self.latent_tokens.expand(B, -1, -1), h], dim=1)  # (B, T + P, D)
        h = self.norm(self.blocks(h)[:, :T])  # (B, T, D)
        mu, logvar = self.output_proj(h).chunk(2, dim=-1)  # (B, T, d) each
        return mu, logvar


class FlatDecoder(nn.Module):
    """(B, T, d) latents -> (B, P, C) patches."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.input_proj = _proj(cfg.latent_dim, cfg.dec_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.tokens, cfg.dec_dim))
        self.queries = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.dec_dim))
        self.blocks = _blocks(cfg.dec_dim, cfg.dec_depth, cfg.dec_heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(cfg.dec_dim, eps=EPS)
        self.output_proj = _proj(cfg.dec_dim, cfg.in_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, T, d = z.shape
        P = self.cfg.num_patches
        lat = self.input_proj(z) + self.pos_embed  # (B, T, D)
        h = torch.cat([self.queries.expand(B, -1, -1), lat], dim=1)  # (B, P + T, D)
        return self.output_proj(self.norm(self.blocks(h)[:, :P]))  # (B, P, C)


class FlatDinoVAE(nn.Module):
    """Encoder + decoder; `encode`, `decode` and `forward` can be used alone."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = FlatEncoder(cfg)
        self.decoder = FlatDecoder(cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Every init in one place. "official": truncated normal 0.02 (cut at ±2σ, as jax's
        initializer) for every Linear, the latent tokens, the queries and the position embedding;
        biases zero; norms one."""
        init = partial(trunc_normal_tf_, std=0.02, a=-2.0, b=2.0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        enc, dec = self.encoder, self.decoder
        for p in (enc.latent_tokens, dec.queries, dec.pos_embed):
            init(p)
        if self.cfg.init == "toy":
            self._toy_init()

    @torch.no_grad()
    def _toy_init(self) -> None:
        """At 64 wide, 0.02-scale queries and latent path sat on the predict-the-mean plateau
        (DESIGN.md, known facts). The same tensors, started otherwise: queries from 2-D sin-cos
        values, unit-scale latent tokens, Xavier projections into and out of the latents, and
        logvar = -5 at every input (small posterior noise while the decoder learns). The official
        model has no bias to hold that -5, so it rides on the final LayerNorm's bias: the
        normalised tokens have zero mean over channels, so with that bias at 1 the all-ones
        direction is a constant input, which the logvar rows read (-5/D each) and the mu rows are
        made blind to (their mean removed). Measured on the demo's digits, 300 steps at batch 64:
        validation MSE 0.13 with this, 0.19 with logvar starting at 0."""
        cfg, enc, dec = self.cfg, self.encoder, self.decoder
        side = math.isqrt(cfg.num_patches)
        if side * side == cfg.num_patches:
            dec.queries.copy_(sincos_2d(cfg.num_patches, cfg.dec_dim)[None])
        nn.init.normal_(enc.latent_tokens)
        for proj in (enc.output_proj, dec.input_proj):
            if isinstance(proj, nn.Linear):
                nn.init.xavier_uniform_(proj.weight)
        if isinstance(enc.output_proj, nn.Linear):
            w, d = enc.output_proj.weight, cfg.latent_dim  # (2d, D): mu rows, then logvar rows
            enc.norm.bias.fill_(1.0)
            w[:d] -= w[:d].mean(dim=1, keepdim=True)
            w[d:] = -5.0 / cfg.enc_dim

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
    x: torch.Tensor,
    x_hat: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float,
    recon: str = "mse",
    reduce_over: int | None = None,
) -> dict[str, torch.Tensor]:
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
