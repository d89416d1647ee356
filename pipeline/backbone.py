"""Loading the DINOv2 backbone's weights: local files (timm safetensors, the original `.pth`, a
transformers directory) or the Hugging Face hub; the model itself is `flatdino.models.dinov2`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ..models.dinov2 import (
    BACKBONES,
    BackboneSpec,
    DinoPatchFeatures,
    build_vit,
    hf_to_dinov2,
    state_sha256,
)
from .errors import WeightsError

HUB_HINT = (
    "pass a local file with --weights PATH: timm safetensors (vit_base_patch14_reg4_dinov2), the "
    "original dinov2_vitb14_reg4_pretrain.pth, or a transformers checkpoint directory "
    "(facebook/dinov2-with-registers-base)"
)


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
