"""The RAE pixel decoder: DINOv2 patch features (B, 256, 768) -> RGB images (B, 3, 256, 256).

Same architecture and state-dict names as RAE's `GeneralDecoder` (bytetriper/RAE,
src/stage1/decoders/decoder.py) so that the published `decoders/dinov2/wReg_base/ViTXL_n08/model.pt`
loads unchanged with strict key matching: a linear embedding to the decoder width, a learned CLS
token prepended, a position embedding over the 1 + 256 positions, pre-norm ViT-MAE layers
(LayerNorm eps 1e-12, exact GELU), a final LayerNorm, a linear head to 16·16·3 values per patch,
the CLS dropped, unpatchified with channels last inside a patch, and the ImageNet mean/std undone.
No clamping (as RAE's `decode`): callers clamp to [0, 1]. The position embedding starts as 2-D
sin-cos values with a zero CLS row, but a checkpoint's stored values are always loaded, never
regenerated. Pure nn.Module.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .configs import PIXEL_DECODER_PRESETS as PIXEL_DECODER_PRESETS
from .configs import PixelDecoderConfig as PixelDecoderConfig
from .configs import pixel_decoder_preset as pixel_decoder_preset
from .dinov2 import IMAGENET_MEAN, IMAGENET_STD
from .vae import sincos_2d


class _Linear(nn.Module):
    """A Linear under the attribute name RAE's checkpoint uses (`….dense`)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))


class _Attention(nn.Module):
    """`attention.attention.{query,key,value}` and `attention.output.dense`, through SDPA."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention = _SelfAttention(dim)
        self.output = _Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        a = self.attention
        q, k, v = (
            p(x).view(B, N, self.heads, D // self.heads).transpose(1, 2)
            for p in (a.query, a.key, a.value)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        return self.output.dense(out.transpose(1, 2).reshape(B, N, D))


class DecoderLayer(nn.Module):
    """One pre-norm ViT-MAE layer: x + attn(LN(x)), then x + fc2(gelu(fc1(LN(x))))."""

    def __init__(self, cfg: PixelDecoderConfig):
        super().__init__()
        self.attention = _Attention(cfg.dim, cfg.heads)
        self.intermediate = _Linear(cfg.dim, cfg.mlp_dim)
        self.output = _Linear(cfg.mlp_dim, cfg.dim)
        self.layernorm_before = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.layernorm_after = nn.LayerNorm(cfg.dim, eps=cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class PixelDecoder(nn.Module):
    """images = model(features): (B, P, C) DINOv2 patch features -> (B, 3, H, W), not clamped."""

    def __init__(self, cfg: PixelDecoderConfig):
        super().__init__()
        self.cfg = cfg
        D, patch_dim = cfg.dim, cfg.patch_size**2 * cfg.channels  # width; pixels per patch
        self.decoder_embed = nn.Linear(cfg.in_dim, D)
        # Fixed in RAE (requires_grad=False); its stored values are what a checkpoint loads.
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, cfg.num_patches + 1, D), requires_grad=False
        )
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.depth)])
        self.decoder_norm = nn.LayerNorm(D, eps=cfg.eps)
        self.decoder_pred = nn.Linear(D, patch_dim)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """2-D sin-cos positions with a zero CLS row (as RAE); zero CLS token; torch's Linear init."""
        pos = sincos_2d(self.cfg.num_patches, self.cfg.dim)  # (P, D)
        with torch.no_grad():
            self.decoder_pos_embed.copy_(torch.cat([torch.zeros(1, self.cfg.dim), pos])[None])

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, P, p·p·3) -> (B, 3, H, W), channels last inside a patch (RAE's 'nhwpqc->nchpwq')."""
        B, P, _ = x.shape
        g, p, c = math.isqrt(P), self.cfg.patch_size, self.cfg.channels
        x = x.reshape(B, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, c, g * p, g * p)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        B, P, C = features.shape
        x = self.decoder_embed(features)  # (B, P, D)
        x = (
            torch.cat([self.trainable_cls_token.expand(B, -1, -1), x], dim=1)
            + self.decoder_pos_embed
        )
        for layer in self.decoder_layers:
            x = layer(x)
        x = self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, P, p·p·3), CLS dropped
        return self.unpatchify(x) * self.std + self.mean  # (B, 3, H, W), ImageNet stats undone


def count_pixel_decoder_parameters(cfg: PixelDecoderConfig) -> int:
    """Parameters of a preset (the frozen position table included), built on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in PixelDecoder(cfg).parameters())
