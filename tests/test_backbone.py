"""The backbone equals transformers' Dinov2WithRegistersModel (RAE's reference) in every format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from flatdino.models.dinov2 import BACKBONES, BackboneSpec, build_vit, hf_to_dinov2, state_sha256
from flatdino.pipeline.backbone import load_backbone, read_state_dict
from flatdino.pipeline.errors import WeightsError

TINY = BACKBONES["tiny"]


@pytest.fixture(scope="module")
def hf_model():
    """A random transformers DINOv2-with-registers shaped like the tiny preset, 518-pixel grid."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(
        hidden_size=TINY.embed_dim,
        num_hidden_layers=TINY.depth,
        num_attention_heads=TINY.num_heads,
        intermediate_size=4 * TINY.embed_dim,
        num_register_tokens=4,
        patch_size=14,
        image_size=518,
        layerscale_value=1.0,
        attn_implementation="eager",
    )
    torch.manual_seed(1)
    model = Dinov2WithRegistersModel(cfg).eval()
    with torch.no_grad():  # every parameter random and O(1): biases, norms, layer scales too
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 1 else 0.2))
    return model


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(2)
    return torch.randn(3, 3, 224, 224)


def hf_reference(model, x: torch.Tensor) -> torch.Tensor:
    """RAE's features: last hidden state with the final LayerNorm's affine removed, patches only."""
    with torch.no_grad():
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        normed = F.layer_norm(hidden, hidden.shape[-1:], eps=model.config.layer_norm_eps)
    return normed[:, 1 + model.config.num_register_tokens :]  # (B, 256, C)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def save_format(fmt: str, model, tmp_path: Path) -> Path:
    """The same weights as a transformers directory, an original DINOv2 .pth, or timm safetensors."""
    if fmt == "transformers":
        model.save_pretrained(tmp_path / "hf")
        return tmp_path / "hf"
    original = hf_to_dinov2(model.state_dict())
    if fmt == "dinov2-pth":
        torch.save(original, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
        return tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    # timm's hub files hold the model at its native 518 pixels (37x37 grid, no CLS position)
    vit518 = VisionTransformer(
        img_size=518,
        patch_size=14,
        embed_dim=TINY.embed_dim,
        depth=TINY.depth,
        num_heads=TINY.num_heads,
        init_values=1e-5,
        reg_tokens=4,
        no_embed_class=True,
        num_classes=0,
    )
    vit518.load_state_dict(checkpoint_filter_fn(original, vit518))
    save_file(vit518.state_dict(), tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors"


@pytest.mark.parametrize("fmt", ["transformers", "dinov2-pth", "timm-safetensors"])
def test_parity_with_transformers(fmt, hf_model, images, tmp_path):
    model, sha = load_backbone("tiny", str(save_format(fmt, hf_model, tmp_path)))
    with torch.no_grad():
        ours = model(images)
    ref = hf_reference(hf_model, images)
    assert ours.shape == (3, 256, TINY.embed_dim)
    assert rel_err(ours, ref) < 1e-5
    assert len(sha) == 64


def test_same_weights_same_sha_in_every_format(hf_model, tmp_path):
    shas = {}
    for fmt in ("transformers", "dinov2-pth", "timm-safetensors"):
        (tmp_path / fmt).mkdir()
        shas[fmt] = load_backbone("tiny", str(save_format(fmt, hf_model, tmp_path / fmt)))[1]
    assert len(set(shas.values())) == 1
    assert shas["transformers"] != load_backbone("tiny")[1]


def test_affine_norm_is_not_applied(hf_model, images, tmp_path):
    """Negative control: the affine final norm (timm forward_features) is a different space."""
    model, _ = load_backbone("tiny", str(save_format("dinov2-pth", hf_model, tmp_path)))
    with torch.no_grad():
        affine = model.vit.forward_features(images)[:, model.vit.num_prefix_tokens :]
        ours = model(images)
    assert rel_err(affine, ours) > 0.1
    with torch.no_grad():
        hf_affine = hf_model(pixel_values=images).last_hidden_state[:, 5:]
    assert rel_err(affine, hf_affine) < 1e-5  # ...and equals transformers' affine output


def test_cls_position_is_folded_into_cls_token(hf_model):
    """transformers adds pos[:, :1] to CLS; timm's no_embed_class model must carry it in the token."""
    vit = build_vit(TINY)
    sd = checkpoint_filter_fn(hf_to_dinov2(hf_model.state_dict()), vit)
    emb = hf_model.embeddings
    expected = emb.cls_token + emb.position_embeddings[:, :1]
    torch.testing.assert_close(sd["cls_token"], expected, rtol=0, atol=0)
    assert sd["pos_embed"].shape == (1, 256, TINY.embed_dim)


def test_bf16_error_against_fp32(images):
    """bf16 autocast error on the tiny backbone; the README quotes this measurement."""
    model, _ = load_backbone("tiny")
    with torch.no_grad():
        fp32 = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(images).float()
    err = rel_err(bf16, fp32)
    print(f"bf16 relative error vs fp32: {err:.2e}")
    assert 0 < err < 2e-2


def test_tiny_is_seeded_and_keeps_the_dinov2_structure():
    (a, sha_a), (_, sha_b) = load_backbone("tiny"), load_backbone("tiny")
    assert sha_a == sha_b == state_sha256(a.vit)
    assert a.vit.num_prefix_tokens == 5 and a.vit.patch_embed.patch_size == (14, 14)
    assert a.num_patches == 256 and a.vit.no_embed_class


def test_hub_unreachable_names_the_option(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="--weights PATH"):
        load_backbone("dinov2-vitb14-reg")


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_bad_weights_file_is_a_clear_error(content, tmp_path):
    path = tmp_path / "w.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match="w.pth"):
        read_state_dict(str(path))


def test_weights_for_another_architecture_are_refused(tmp_path):
    other = build_vit(BackboneSpec("other", 32, 1, 2))
    save_file(other.state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="--backbone"):
        load_backbone("tiny", str(tmp_path / "other.safetensors"))


def test_parity_at_vitb_size(tmp_path):
    """The real preset (768 wide, 12 layers, 12 heads) against transformers, random weights."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    vitb = BACKBONES["dinov2-vitb14-reg"]
    cfg = Dinov2WithRegistersConfig(
        hidden_size=vitb.embed_dim,
        num_hidden_layers=vitb.depth,
        num_attention_heads=vitb.num_heads,
        intermediate_size=4 * vitb.embed_dim,
        num_register_tokens=4,
        patch_size=14,
        image_size=518,
        attn_implementation="eager",
    )
    torch.manual_seed(3)
    hf = Dinov2WithRegistersModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_backbone("dinov2-vitb14-reg", str(tmp_path / "hf"))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = model(x)
    assert ours.shape == (2, 256, 768)
    assert rel_err(ours, hf_reference(hf, x)) < 1e-5
