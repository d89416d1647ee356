"""DiT-DH on FlatDINO latents: a DiT encoder plus a wide decoupled head (B, T, d) -> velocity.

The official `DiTDH` with `patch_size=None` (noctrog/flatdino `decoder/dit_dh.py`, after RAE's
DiT^DH), tensor for tensor. The encoder embeds the noisy tokens (Linear d -> D plus a learned
position table) and runs `depth` LightningDiT blocks conditioned on c = silu(t_emb + y_emb); each
block's adaLN applies silu once more, as the official Sequential(silu, Linear) does. Its output s
becomes the head's per-token condition: s' = Linear_D->H(silu(t_emb + s)). The head embeds the
same noisy tokens again (Linear d -> H, no position table; RoPE only) and runs `dh_depth` blocks
at width H whose adaLN reads s' token by token, and the final layer is modulated by s' too. The
time embedding (Gaussian Fourier features, Linear-SiLU-Linear) and the class table are the
encoder's width. Optional registers are prepended in both parts (the official docstring says
"head only", its code adds them to the encoder too) and dropped before the final layer.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import RmsNorm, trunc_normal_tf_

from .configs import DIT_DH_PRESETS as DIT_DH_PRESETS
from .configs import GENERATOR_PRESETS as GENERATOR_PRESETS
from .configs import DiTConfig, generator_config, generator_preset
from .configs import DiTDHConfig as DiTDHConfig
from .dit import EPS, DiTBlock, FourierTimeEmbedding, LightningDiT, modulate, rope_1d

__all__ = [
    "DIT_DH_PRESETS",
    "GENERATOR_PRESETS",
    "DiTDH",
    "DiTDHConfig",
    "build_generator",
    "count_generator_parameters",
    "generator_config",
    "generator_preset",
]


class DiTDH(nn.Module):
    """v = model(x_t, t, y): x_t (B, T, d) at time t (B,) in [0, 1], class y (B,) (num_classes: null)."""

    def __init__(self, cfg: DiTDHConfig):
        super().__init__()
        self.cfg = cfg
        D, H, R = cfg.dim, cfg.dh_dim, cfg.registers
        self.embed = nn.Linear(cfg.latent_dim, D)  # s_embedder
        self.pos = nn.Parameter(torch.zeros(1, cfg.tokens, D))  # learned (1, T, D)
        self.head_embed = nn.Linear(cfg.latent_dim, H)  # x_embedder
        self.project = nn.Linear(D, H) if D != H else nn.Identity()  # s_projector
        self.t_embed = FourierTimeEmbedding(D)
        self.y_embed = nn.Embedding(cfg.num_classes + 1, D)  # + the null class for CFG
        if R:
            self.registers = nn.Parameter(torch.zeros(1, R, D))
            self.head_registers = nn.Parameter(torch.zeros(1, R, H))
        for name, width, heads in (("rope", D, cfg.heads), ("head_rope", H, cfg.dh_heads)):
            sin, cos = rope_1d(cfg.tokens, width // heads, cfg.rope_base)
            self.register_buffer(f"{name}_sin", sin if cfg.use_rope else None, persistent=False)
            self.register_buffer(f"{name}_cos", cos if cfg.use_rope else None, persistent=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(D, cfg.heads, cfg.mlp_hidden) for _ in range(cfg.depth)]
        )
        self.head_blocks = nn.ModuleList(
            [DiTBlock(H, cfg.dh_heads, cfg.dh_mlp_hidden) for _ in range(cfg.dh_depth)]
        )
        self.final_norm = RmsNorm(H, eps=EPS)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(H, 2 * H))
        self.out = nn.Linear(H, cfg.latent_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official `DiTDH.__init__`: Xavier-uniform for the blocks' attention and MLP and for
        the encoder-to-head projection; truncated normal (cut at ±2σ, as jax's initializer) 0.01
        for both token embeddings and the registers, 0.02 for the position table, the time MLP
        and the class table; adaLN and output layers zero (adaLN-Zero). Biases zero, norm scales
        one, W ~ N(0, 1)."""
        tn = partial(trunc_normal_tf_, a=-2.0, b=2.0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.embed.weight, self.head_embed.weight):
            tn(p, std=0.01)
        if self.cfg.registers:
            tn(self.registers, std=0.01)
            tn(self.head_registers, std=0.01)
        for p in (self.pos, self.t_embed.mlp[0].weight, self.t_embed.mlp[2].weight):
            tn(p, std=0.02)
        tn(self.y_embed.weight, std=0.02)
        zero = [b.ada[-1] for b in (*self.blocks, *self.head_blocks)]
        for layer in [*zero, self.final_ada[-1], self.out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def _with_registers(self, h: torch.Tensor, registers: torch.Tensor | None) -> torch.Tensor:
        if registers is None:
            return h
        return torch.cat([registers.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        R = self.cfg.registers
        s = self.embed(x) + self.pos  # (B, T, D)
        t_emb = self.t_embed(t).to(s.dtype)  # (B, D)
        c = F.silu(t_emb + self.y_embed(y))  # (B, D); each block's adaLN applies silu again
        s = self._with_registers(s, getattr(self, "registers", None))  # (B, R + T, D)
        for block in self.blocks:
            s = block(s, c, self.rope_sin, self.rope_cos)
        s = self.project(F.silu(t_emb[:, None] + s))  # (B, R + T, H): the head's condition
        h = self._with_registers(self.head_embed(x), getattr(self, "head_registers", None))
        for block in self.head_blocks:
            h = block(h, s, self.head_rope_sin, self.head_rope_cos)  # per-token adaLN
        h, s = h[:, R:], s[:, R:]  # (B, T, H) each
        shift, scale = self.final_ada(s).chunk(2, dim=-1)  # (B, T, H) each
        return self.out(modulate(self.final_norm(h), shift, scale))  # (B, T, d)


def build_generator(cfg: DiTConfig | DiTDHConfig) -> LightningDiT | DiTDH:
    """The velocity network a config describes (its class follows the config's kind)."""
    return DiTDH(cfg) if isinstance(cfg, DiTDHConfig) else LightningDiT(cfg)


def count_generator_parameters(cfg: DiTConfig | DiTDHConfig) -> int:
    """Parameters of a generator config, built on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_generator(cfg).parameters())
