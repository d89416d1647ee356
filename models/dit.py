"""LightningDiT on FlatDINO latents: (B, T, d) noisy tokens, time, class -> velocity (B, T, d).

Paper §3.3 / §4.3 and hustvl/LightningDiT: a linear token embedding d -> D, a fixed 1-D sin-cos
position embedding plus 1-D rotary embeddings in attention (interleaved channel pairs, as the
paper's public code), RMSNorm, QK-norm, SwiGLU (hidden 8D/3), adaLN-Zero conditioning on time and
class, a null class for classifier-free guidance, and a zero-initialised output. Pure nn.Module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import RmsNorm, SwiGLU
from timm.layers.pos_embed_sincos import apply_rot_embed


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of one LightningDiT (saved as config.json; rebuilds the model)."""

    tokens: int = 32  # T: latent tokens (read from the latents store)
    latent_dim: int = 128  # d: channels per token (read from the latents store)
    dim: int = 1152  # D: width
    depth: int = 28
    heads: int = 16
    mlp_hidden_ratio: float = 8 / 3  # SwiGLU hidden = ratio · D (3072 for D = 1152)
    num_classes: int = 1000  # class index num_classes is the null (unconditional) class
    rope_base: float = 10000.0

    def to_dict(self) -> dict:
        return asdict(self)


DIT_PRESETS: dict[str, DiTConfig] = {
    "dit-xl": DiTConfig(dim=1152, depth=28, heads=16),  # the paper's generator
    "dit-l": DiTConfig(dim=1024, depth=24, heads=16),
    "dit-b": DiTConfig(dim=768, depth=12, heads=12),
    "dit-s": DiTConfig(dim=384, depth=12, heads=6),
    "tiny": DiTConfig(dim=64, depth=2, heads=2, num_classes=10),
}


def dit_preset(name: str, **overrides) -> DiTConfig:
    return replace(DIT_PRESETS[name], **overrides)


def sincos_1d(length: int, dim: int) -> torch.Tensor:
    """(length, dim) fixed 1-D sin-cos position values (first half sin, second half cos)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], dim=1)


def rope_1d(length: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """sin, cos (length, head_dim) for interleaved-pair rotary embeddings (timm's `rot` layout)."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv[None]  # (L, hd/2)
    return angles.sin().repeat_interleave(2, -1), angles.cos().repeat_interleave(2, -1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) times in [0, 1] -> (B, dim) sinusoidal features, in fp32 (DiT's TimestepEmbedder)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = (t.float() * 1000.0)[:, None] * freqs[None]  # DiT scale: t in [0, 1000]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class RopeAttention(nn.Module):
    """Self-attention with QK RMSNorm and 1-D rotary embeddings, through SDPA."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = RmsNorm(dim // heads), RmsNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q = apply_rot_embed(self.q_norm(q), sin, cos)  # (B, H, T, hd)
        k = apply_rot_embed(self.k_norm(k), sin, cos)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class DiTBlock(nn.Module):
    """Pre-norm block with adaLN-Zero: shift/scale/gate per branch from the conditioning."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.dim
        self.norm1 = RmsNorm(D, affine=False)
        self.attn = RopeAttention(D, cfg.heads)
        self.norm2 = RmsNorm(D, affine=False)
        self.mlp = SwiGLU(D, int(cfg.mlp_hidden_ratio * D))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor
    ) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, dim=-1)  # (B, D) each
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, sc1), sin, cos)
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), s2, sc2))


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
        self.t_embed = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embed = nn.Embedding(cfg.num_classes + 1, D)  # + the null class for CFG
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_norm = RmsNorm(D, affine=False)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.out = nn.Linear(D, cfg.latent_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: Xavier linears, N(0, 0.02) embeddings, adaLN and output zeroed (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for lin in self.t_embed:
            if isinstance(lin, nn.Linear):
                nn.init.normal_(lin.weight, std=0.02)
        for ada in [b.ada[-1] for b in self.blocks] + [self.final_ada[-1], self.out]:
            nn.init.zeros_(ada.weight)
            nn.init.zeros_(ada.bias)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = self.embed(x) + self.pos  # (B, T, D)
        c = self.t_embed(timestep_embedding(t, 256).to(h.dtype)) + self.y_embed(y)  # (B, D)
        for block in self.blocks:
            h = block(h, c, self.rope_sin, self.rope_cos)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.out(modulate(self.final_norm(h), shift, scale))  # (B, T, d)


def count_dit_parameters(cfg: DiTConfig) -> int:
    """Parameters of a preset, built on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in LightningDiT(cfg).parameters())
