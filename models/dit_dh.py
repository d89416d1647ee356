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

With `cls_dim` (the official `in_cls_dim`) x is the pair (tokens, cls): e = Linear_C->D(cls) is
the encoder's first token (before the registers; no position value, not rotated by RoPE), the
head's first token is the projector of that same e (not a second embedding), the head conditions
it on the encoder's CLS output like any token, and the CLS velocity is Linear_H->C of the head's
first token after its last block (before the final norm); the output is the pair (v, v_cls).
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
from .dit import (
    EPS,
    DiTBlock,
    FourierTimeEmbedding,
    LightningDiT,
    modulate,
    rope_1d,
    skip_first,
    split_cls,
)

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
        if cfg.cls_dim:  # the official in_cls_proj / out_cls_proj
            self.cls_embed = nn.Linear(cfg.cls_dim, D)
            self.cls_out = nn.Linear(H, cfg.cls_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official `DiTDH.__init__`: Xavier-uniform for the blocks' attention and MLP and for
        the encoder-to-head projection; truncated normal (cut at ±2σ, as jax's initializer) 0.01
        for both token embeddings, the registers and both CLS layers, 0.02 for the position table,
        the time MLP and the class table; adaLN and output layers zero (adaLN-Zero). Biases zero,
        norm scales one, W ~ N(0, 1)."""
        tn = partial(trunc_normal_tf_, a=-2.0, b=2.0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        cls = (self.cls_embed.weight, self.cls_out.weight) if self.cfg.cls_dim else ()
        for p in (self.embed.weight, self.head_embed.weight, *cls):
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

    def forward(
        self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], t: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: the tokens (B, T, d), or with cls_dim the pair (tokens, cls (B, C)); the velocity
        comes back in the same form."""
        x, cls = split_cls(x, self.cfg.cls_dim)
        B, T, d = x.shape
        R = self.cfg.registers
        s = self.embed(x) + self.pos  # (B, T, D)
        t_emb = self.t_embed(t).to(s.dtype)  # (B, D)
        c = F.silu(t_emb + self.y_embed(y))  # (B, D); each block's adaLN applies silu again
        s = self._with_registers(s, getattr(self, "registers", None))  # (B, R + T, D)
        rope = (self.rope_sin, self.rope_cos)
        head_rope = (self.head_rope_sin, self.head_rope_cos)
        if cls is not None:
            e = self.cls_embed(cls)[:, None].to(s.dtype)  # (B, 1, D)
            s = torch.cat([e, s], dim=1)  # (B, 1 + R + T, D)
            rope, head_rope = skip_first(*rope), skip_first(*head_rope)
        for block in self.blocks:
            s = block(s, c, *rope)
        s = self.project(F.silu(t_emb[:, None] + s))  # (B, [1 +] R + T, H): the head's condition
        h = self._with_registers(self.head_embed(x), getattr(self, "head_registers", None))
        if cls is not None:
            h = torch.cat([self.project(e).to(h.dtype), h], dim=1)  # (B, 1 + R + T, H)
        for block in self.head_blocks:
            h = block(h, s, *head_rope)  # per-token adaLN
        first = R + (cls is not None)  # the latent tokens start here
        v_cls = self.cls_out(h[:, 0]) if cls is not None else None  # (B, C), un-normalised
        h, s = h[:, first:], s[:, first:]  # (B, T, H) each
        shift, scale = self.final_ada(s).chunk(2, dim=-1)  # (B, T, H) each
        v = self.out(modulate(self.final_norm(h), shift, scale))  # (B, T, d)
        return v if v_cls is None else (v, v_cls)


def build_generator(cfg: DiTConfig | DiTDHConfig) -> LightningDiT | DiTDH:
    """The velocity network a config describes (its class follows the config's kind)."""
    return DiTDH(cfg) if isinstance(cfg, DiTDHConfig) else LightningDiT(cfg)


def count_generator_parameters(cfg: DiTConfig | DiTDHConfig) -> int:
    """Parameters of a generator config, built on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_generator(cfg).parameters())
