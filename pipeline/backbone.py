"""The frozen DINOv2-with-registers backbone (timm) and its weight loading.

Features are the 256 patch tokens after the final LayerNorm *without* its affine weight and bias:
the space RAE's pixel decoder and FlatDINO were trained on (RAE `Dinov2withNorm` sets
`elementwise_affine=False` on transformers' final layernorm).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .errors import WeightsError

HUB_HINT = (
    "pass a local file with --weights PATH: timm safetensors (vit_base_patch14_reg4_dinov2), the "
    "original dinov2_vitb14_reg4_pretrain.pth, or a transformers checkpoint directory "
    "(facebook/dinov2-with-registers-base)"
)


@dataclass(frozen=True)
class BackboneSpec:
    """One registered backbone: timm ViT arguments and where pretrained weights come from."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    timm_name: str | None = None  # hub weights via timm; None: seeded random init (tiny)
    patch_size: int = 14
    reg_tokens: int = 4
    img_size: int = 224  # 16x16 patches; pretrained 37x37 position grids are resampled on load
    init_seed: int = 0  # seeds the random init of presets without pretrained weights


BACKBONES: dict[str, BackboneSpec] = {
    "dinov2-vitb14-reg": BackboneSpec(
        "dinov2-vitb14-reg", 768, 12, 12, timm_name="vit_base_patch14_reg4_dinov2"
    ),
    # Same structure (patch 14, 4 registers, LayerScale, final norm) at toy size, random weights:
    # for tests and the offline demo.
    "tiny": BackboneSpec("tiny", 64, 2, 2),
}


def build_vit(spec: BackboneSpec) -> VisionTransformer:
    """The timm DINOv2 ViT of `spec` (no classifier head), randomly initialised with its seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        return VisionTransformer(
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


class DinoPatchFeatures(nn.Module):
    """(B, 3, 224, 224) normalised images -> (B, 256, C) patch tokens, final LN without affine."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit
        self.num_patches = vit.patch_embed.num_patches
        self.dim = vit.embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(x)  # (B, 256, C)
        x = vit._pos_embed(x)  # (B, 1 + 4 + 256, C)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        x = F.layer_norm(x, (self.dim,), eps=vit.norm.eps)  # the norm's statistics, not its affine
        return x[:, vit.num_prefix_tokens :]  # (B, 256, C)


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


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read weights from a safetensors file, a `.pth` (weights only) or a transformers directory."""
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"--weights {path!r} does not exist; {HUB_HINT}")
    if p.is_dir():
        files = [p / "model.safetensors", p / "pytorch_model.bin"]
        found = [f for f in files if f.exists()]
        if not found:
            raise WeightsError(
                f"--weights directory {path!r} has neither model.safetensors nor pytorch_model.bin"
            )
        p = found[0]
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:
        raise WeightsError(f"cannot read weights {str(p)!r}: {e}") from e
    for key in ("model", "state_dict", "teacher"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if any(k.startswith(("embeddings.", "dinov2.embeddings.")) for k in sd):
        sd = hf_to_dinov2(sd)
    return sd


def state_sha256(module: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of a state dict in key order: format-independent."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_backbone(name: str, weights: str | None = None) -> tuple[DinoPatchFeatures, str]:
    """Build backbone `name` with weights from `weights`, the hub, or its seed; returns (model, sha)."""
    if name not in BACKBONES:
        raise WeightsError(f"unknown backbone {name!r}; choose --backbone from {sorted(BACKBONES)}")
    spec = BACKBONES[name]
    vit = build_vit(spec)
    if weights is not None:
        sd = checkpoint_filter_fn(read_state_dict(weights), vit)
        _load_strict(vit, sd, weights)
    elif spec.timm_name is not None:
        vit = _from_hub(spec)
    vit.eval().requires_grad_(False)
    return DinoPatchFeatures(vit), state_sha256(vit)


def _from_hub(spec: BackboneSpec) -> VisionTransformer:
    import logging

    import timm

    logging.getLogger("flatdino").info(
        "loading %s weights from the Hugging Face hub (cache or download); offline, this fails "
        "after retries: pass --weights PATH or set HF_HUB_OFFLINE=1",
        spec.timm_name,
    )
    try:
        return timm.create_model(
            spec.timm_name, pretrained=True, img_size=spec.img_size, num_classes=0
        )
    except Exception as e:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise WeightsError(
            f"could not get {spec.timm_name} weights from the Hugging Face hub{offline}: "
            f"{type(e).__name__}; {HUB_HINT}"
        ) from e


def _load_strict(vit: VisionTransformer, sd: dict[str, torch.Tensor], source: str) -> None:
    own = vit.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise WeightsError(
            f"weights {source!r} do not fit this backbone: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, wrong shape {shapes[:3]}; check --backbone matches the file"
        )
    vit.load_state_dict(sd, strict=True)
