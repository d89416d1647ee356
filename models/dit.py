"""LightningDiT on FlatDINO latents: (B, T, d) noisy tokens, time, class -> velocity (B, T, d).

The official generator (noctrog/flatdino `models/dit.py`, after hustvl/LightningDiT), tensor for
tensor: a linear token embedding d -> D with bias plus a fixed 1-D sin-cos position embedding,
1-D rotary embeddings in attention (interleaved channel pairs), no QK-norm, RMSNorm (eps 1e-6) with
a learnable scale, SwiGLU with bias (hidden round(8D/3)), adaLN-Zero conditioning
([shift, scale, gate] × 2 per block, a final [shift, scale]) on the sum of a time embedding and a
class embedding with a null class for classifier-free guidance. The time embedding is Gaussian
Fourier features of the raw t in [0, 1] (a fixed random buffer W of 256 frequencies, saved with the
weights) followed by Linear-SiLU-Linear. Pure nn.Module.

With `cls_dim` (the official `in_cls_dim`) the model also moves the DINOv2 CLS token: x is the
pair (tokens, cls), cls (B, C) enters through a Linear C -> D as an extra first token (no position
value, not rotated by RoPE), and its velocity is a Linear D -> C of that token's residual stream
after the last block (before the final norm); the output is the pair (v, v_cls).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import RmsNorm, SwiGLU, trunc_normal_tf_
from timm.layers.pos_embed_sincos import apply_rot_embed

from .configs import DIT_PRESETS as DIT_PRESETS
from .configs import DiTConfig as DiTConfig
from .configs import dit_preset as dit_preset

EPS = 1e-6
FOURIER = 256  # frequencies of the time embedding


def sincos_1d(length: int, dim: int) -> torch.Tensor:
    """(length, dim) fixed 1-D sin-cos position values (first half sin, second half cos)."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    freq = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=1).float()


def rope_1d(length: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """sin, cos (length, head_dim) for interleaved-pair rotary embeddings (timm's `rot` layout)."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv[None]  # (L, hd/2)
    return angles.sin().repeat_interleave(2, -1), angles.cos().repeat_interleave(2, -1)


class FourierTimeEmbedding(nn.Module):
    """t (B,) in [0, 1] -> (B, D): [sin(2π t W), cos(2π t W)] -> Linear -> SiLU -> Linear.

    W (256 frequencies, N(0, 1) at init) is a fixed buffer, saved with the weights."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("W", torch.randn(FOURIER))
        self.mlp = nn.Sequential(nn.Linear(2 * FOURIER, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.W.float()[None] * (2 * math.pi)  # (B, 256), in fp32
        feats = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


def skip_first(
    sin: torch.Tensor | None, cos: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """RoPE tables with a leading identity row (sin 0, cos 1): the CLS token, first in the
    sequence, is left unrotated while the latent tokens keep positions 0 .. T-1 (the official
    `rope_skip_cls`)."""
    if sin is None or cos is None:
        return sin, cos
    return F.pad(sin, (0, 0, 1, 0)), F.pad(cos, (0, 0, 1, 0), value=1.0)  # (1 + T, hd)


def split_cls(
    x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], cls_dim: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens, cls or None) of a generator's input: the pair (tokens, cls) iff cls_dim > 0."""
    tokens, cls = x if isinstance(x, tuple) else (x, None)
    if (cls is not None) != bool(cls_dim):
        raise ValueError(
            f"a generator with cls_dim={cls_dim} takes "
            + ("the pair (tokens, cls)" if cls_dim else "the tokens alone")
        )
    return tokens, cls


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, T, D) with shift and scale (B, 1, D) for the whole sequence or (B, T, D) per token."""
    return x * (1 + scale) + shift


class RopeAttention(nn.Module):
    """Self-attention with 1-D rotary embeddings on q and k, through SDPA."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # the official (three heads head_dim) layout
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, sin: torch.Tensor | None, cos: torch.Tensor | None
    ) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if sin is not None and cos is not None:  # None: no rotary embedding (DiT-DH use_rope off)
            q, k = apply_rot_embed(q, sin, cos), apply_rot_embed(k, sin, cos)  # (B, H, T, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class DiTBlock(nn.Module):
    """Pre-norm block with adaLN-Zero: shift/scale/gate per branch from the conditioning c, one
    vector per sample (B, D) or one per token (B, T, D) (the DiT-DH head's)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = RmsNorm(dim, eps=EPS)
        self.attn = RopeAttention(dim, heads)
        self.norm2 = RmsNorm(dim, eps=EPS)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        sin: torch.Tensor | None,
        cos: torch.Tensor | None,
    ) -> torch.Tensor:
        c = c[:, None] if c.dim() == 2 else c  # (B, 1 or T, D)
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        x = x + g1 * self.attn(modulate(self.norm1(x), s1, sc1), sin, cos)
        return x + g2 * self.mlp(modulate(self.norm2(x), s2, sc2))


class LightningDiT(nn.Module):
    """v = model(x_t, t, y): x_t (B, T, d) at time t (B,) in [0, 1], class y (B,) (num_classes: null)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.embed = nn.Linear(cfg.latent_dim, D)
        self.register_buffer("pos", sincos_1d(cfg.tokens, D)[None], persistent=False)  # (1, T, D)
        sin, cos = rope_1d(cfg.tokens, D // cfg.heads, cfg.rope_base)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.t_embed = FourierTimeEmbedding(D)
        self.y_embed = nn.Embedding(cfg.num_classes + 1, D)  # + the null class for CFG
        blocks = [DiTBlock(D, cfg.heads, cfg.mlp_hidden) for _ in range(cfg.depth)]
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = RmsNorm(D, eps=EPS)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.out = nn.Linear(D, cfg.latent_dim)
        if cfg.cls_dim:  # the official in_cls_proj / out_cls_proj
            self.cls_embed = nn.Linear(cfg.cls_dim, D)
            self.cls_out = nn.Linear(D, cfg.cls_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """adaLN-Zero either way. "official": truncated normal 0.02 (cut at ±2σ, as jax's
        initializer) for the attention, MLP, time and class layers, Xavier-uniform for the token
        embedding. "xavier": DiT's init, Xavier for every Linear, N(0, 0.02) for the time MLP and
        the class table. The CLS layers Xavier-uniform in both (the official in/out_cls_proj).
        Biases zero, norm scales one, W ~ N(0, 1)."""
        if self.cfg.init == "official":
            linear = embedding = partial(trunc_normal_tf_, std=0.02, a=-2.0, b=2.0)
        else:
            linear, embedding = nn.init.xavier_uniform_, partial(nn.init.normal_, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                linear(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.embed.weight)
        if self.cfg.cls_dim:
            nn.init.xavier_uniform_(self.cls_embed.weight)
            nn.init.xavier_uniform_(self.cls_out.weight)
        for p in (self.t_embed.mlp[0].weight, self.t_embed.mlp[2].weight, self.y_embed.weight):
            embedding(p)
        for ada in [b.ada[-1] for b in self.blocks] + [self.final_ada[-1], self.out]:
            nn.init.zeros_(ada.weight)
            nn.init.zeros_(ada.bias)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def forward(
        self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], t: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: the tokens (B, T, d), or with cls_dim the pair (tokens, cls (B, C)); the velocity
        comes back in the same form."""
        x, cls = split_cls(x, self.cfg.cls_dim)
        B, T, d = x.shape
        h = self.embed(x) + self.pos  # (B, T, D)
        c = self.t_embed(t).to(h.dtype) + self.y_embed(y)  # (B, D)
        sin, cos = self.rope_sin, self.rope_cos
        if cls is not None:
            h = torch.cat([self.cls_embed(cls)[:, None].to(h.dtype), h], dim=1)  # (B, 1 + T, D)
            sin, cos = skip_first(sin, cos)
        for block in self.blocks:
            h = block(h, c, sin, cos)
        shift, scale = self.final_ada(c)[:, None].chunk(2, dim=-1)  # (B, 1, D) each
        if cls is None:
            return self.out(modulate(self.final_norm(h), shift, scale))  # (B, T, d)
        v = self.out(modulate(self.final_norm(h[:, 1:]), shift, scale))  # (B, T, d)
        return v, self.cls_out(h[:, 0])  # the un-normalised residual stream -> (B, C)


def count_dit_parameters(cfg: DiTConfig) -> int:
    """Parameters of a preset, built on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in LightningDiT(cfg).parameters())
