"""The frozen DINOv2-with-registers backbone as a timm ViT, and the pure converters of its weights.

Features are the 256 patch tokens after the final LayerNorm *without* its affine weight and bias:
the space RAE's pixel decoder and FlatDINO were trained on (RAE `Dinov2withNorm` sets
`elementwise_affine=False` on transformers' final layernorm). Loading weights from files or the
hub is I/O and lives in `flatdino.pipeline.backbone`.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer

from .configs import BACKBONES as BACKBONES
from .configs import BackboneSpec as BackboneSpec

# The normalisation DINOv2 was trained with (and RAE's decoder un-does).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_vit(spec: BackboneSpec) -> VisionTransformer:
    """The timm DINOv2 ViT of `spec` (no classifier head), randomly initialised with its seed.

    A preset without pretrained weights gets a unit-scale 2-D sin-cos position table instead of
    timm's 0.02-scale random one: pretrained DINOv2 patch features tell where the patch is (the
    FlatDINO encoder adds no position embedding of its own and relies on that), and with the
    0.02-scale table two blank patches of the random backbone had the same features."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        vit = VisionTransformer(
            img_size=spec.img_size,
            patch_size=spec.patch_size,
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
            init_values=1e-5,  # LayerScale, as timm's vit_*_dinov2 presets
            reg_tokens=spec.reg_tokens,
            no_embed_class=True,
            num_classes=0,
            dynamic_img_size=False,
        )
    if spec.timm_name is None:
        side = spec.img_size // spec.patch_size
        table = build_sincos2d_pos_embed((side, side), dim=spec.embed_dim, temperature=10000.0)
        with torch.no_grad():
            vit.pos_embed.copy_(table[None])  # (1, 256, C): no_embed_class, patches only
    return vit


class DinoPatchFeatures(nn.Module):
    """(B, 3, 224, 224) normalised images -> (B, 256, C) patch tokens, final LN without affine;
    `tokens` also gives each image's CLS token, the official generator's `in_cls_dim` input
    (noctrog/flatdino `train_generator.py` takes the first token of the same output)."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit
        self.num_patches = vit.patch_embed.num_patches
        self.dim = vit.embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[0]  # (B, 256, C)

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 224, 224) normalised images -> (patches (B, 256, C), CLS (B, C))."""
        vit = self.vit
        x = vit.patch_embed(x)  # (B, 256, C)
        x = vit._pos_embed(x)  # (B, 1 + 4 + 256, C): CLS first
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        x = F.layer_norm(x, (self.dim,), eps=vit.norm.eps)  # the norm's statistics, not its affine
        return x[:, vit.num_prefix_tokens :], x[:, 0]


def hf_to_dinov2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers Dinov2WithRegisters state dict -> the original DINOv2 key layout.

    The original layout is what timm's `checkpoint_filter_fn` converts (it folds the CLS position
    into the CLS token and resamples the 37x37 position grid), so both formats share that path.
    """
    sd = {k.removeprefix("dinov2."): v for k, v in sd.items()}
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "register_tokens": sd["embeddings.register_tokens"],
        "mask_token": sd["embeddings.mask_token"].reshape(1, -1),
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    # Published checkpoints name attention `attention.attention.{query,key,value}` and
    # `attention.output.dense`; transformers >= 5 names it `attention.{q,k,v,o}_proj`.
    v5 = any(".attention.q_proj." in k for k in sd)
    qkv = (
        ("q_proj", "k_proj", "v_proj")
        if v5
        else ("attention.query", "attention.key", "attention.value")
    )
    proj = "o_proj" if v5 else "output.dense"
    for i in range(depth):
        hf, ours = f"encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            parts = [sd[f"{hf}attention.{n}.{p}"] for n in qkv]
            out[ours + f"attn.qkv.{p}"] = torch.cat(parts)  # (3C, C) or (3C,)
            out[ours + f"attn.proj.{p}"] = sd[f"{hf}attention.{proj}.{p}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[ours + f"{n}.{p}"] = sd[hf + f"{n}.{p}"]
        out[ours + "ls1.gamma"] = sd[hf + "layer_scale1.lambda1"]
        out[ours + "ls2.gamma"] = sd[hf + "layer_scale2.lambda1"]
    return out


def state_sha256(module: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of a state dict in key order: format-independent."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
