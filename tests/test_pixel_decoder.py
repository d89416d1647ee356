"""The RAE pixel decoder: the published checkpoint's key layout, layer parity with transformers'
ViT-MAE layer, unpatchify order, loading RAE files strictly, and train-decoder on the digits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from flatdino.models.pixel_decoder import (
    PIXEL_DECODER_PRESETS,
    DecoderLayer,
    PixelDecoder,
    PixelDecoderConfig,
    count_pixel_decoder_parameters,
    pixel_decoder_preset,
)
from flatdino.pipeline.checkpoints import load_pixel_decoder
from flatdino.pipeline.errors import FlatDinoError, WeightsError
from flatdino.pipeline.feature_store import FeatureStore
from flatdino.pipeline.preprocess import (
    ViewRecipe,
    adm_center_crop,
    make_views,
    to_rgb,
    view_pixels,
)
from flatdino.pipeline.sources import load_image
from flatdino.pipeline.targets import TargetImages
from flatdino.trainers.train_decoder import TrainDecoderConfig, train_decoder


def rae_state_dict_shapes(
    dim: int, depth: int, mlp: int, in_dim=768, patches=256, patch=16
) -> dict:
    """The tensors of RAE's GeneralDecoder (bytetriper/RAE src/stage1/decoders/decoder.py, built on
    its copy of the transformers-4 ViTMAELayer) as `torch.save(decoder.state_dict())` writes them."""
    shapes = {
        "decoder_pos_embed": (1, patches + 1, dim),
        "trainable_cls_token": (1, 1, dim),
        "decoder_embed.weight": (dim, in_dim),
        "decoder_embed.bias": (dim,),
        "decoder_norm.weight": (dim,),
        "decoder_norm.bias": (dim,),
        "decoder_pred.weight": (patch * patch * 3, dim),
        "decoder_pred.bias": (patch * patch * 3,),
    }
    for i in range(depth):
        p = f"decoder_layers.{i}."
        for name in ("query", "key", "value"):
            shapes[f"{p}attention.attention.{name}.weight"] = (dim, dim)
            shapes[f"{p}attention.attention.{name}.bias"] = (dim,)
        shapes[f"{p}attention.output.dense.weight"] = (dim, dim)
        shapes[f"{p}attention.output.dense.bias"] = (dim,)
        shapes[f"{p}intermediate.dense.weight"], shapes[f"{p}intermediate.dense.bias"] = (
            (mlp, dim),
            (mlp,),
        )
        shapes[f"{p}output.dense.weight"], shapes[f"{p}output.dense.bias"] = (dim, mlp), (dim,)
        for ln in ("layernorm_before", "layernorm_after"):
            shapes[f"{p}{ln}.weight"], shapes[f"{p}{ln}.bias"] = (dim,), (dim,)
    return shapes


@pytest.mark.parametrize("name", ["rae-vitxl", "rae-vitl", "rae-vitb"])
def test_state_dict_matches_raes_decoder(name):
    cfg = PIXEL_DECODER_PRESETS[name]
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in PixelDecoder(cfg).state_dict().items()}
    assert ours == rae_state_dict_shapes(cfg.dim, cfg.depth, cfg.mlp_dim)


def test_published_decoder_size():
    cfg = PIXEL_DECODER_PRESETS["rae-vitxl"]
    assert (
        cfg.dim,
        cfg.depth,
        cfg.heads,
        cfg.mlp_dim,
        cfg.patch_size,
        cfg.image_size,
        cfg.eps,
    ) == (1152, 28, 16, 4096, 16, 256, 1e-12)
    assert count_pixel_decoder_parameters(cfg) == 415_352_704  # 456 tensors, as RAE's builds


def test_layer_matches_transformers_vit_mae_layer():
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEConfig, ViTMAELayer

    cfg = PixelDecoderConfig(dim=64, heads=4, mlp_dim=128, depth=1)
    hf_cfg = ViTMAEConfig(
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        qkv_bias=True,
    )
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ours, theirs = DecoderLayer(cfg).eval(), ViTMAELayer(hf_cfg).eval()
    rename = {
        "attention.attention.query": "attention.q_proj",
        "attention.attention.key": "attention.k_proj",
        "attention.attention.value": "attention.v_proj",
        "attention.output.dense": "attention.o_proj",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
    }
    state = {k: torch.randn_like(v) * 0.2 for k, v in ours.state_dict().items()}
    ours.load_state_dict(state)
    hf_state = {}
    for k, v in state.items():
        for old, new in rename.items():
            k = k.replace(old, new) if k.startswith(old) else k
        hf_state[k] = v
    theirs.load_state_dict(hf_state, strict=True)
    x = torch.randn(2, 257, 64)
    out = theirs(x)
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(ours(x), out, rtol=1e-5, atol=1e-5)


def test_unpatchify_puts_channels_last_inside_a_patch():
    model = PixelDecoder(pixel_decoder_preset("tiny"))
    x = torch.arange(256 * 768, dtype=torch.float32).view(1, 256, 768)
    img = model.unpatchify(x)  # (1, 3, 256, 256)
    for patch, p, q, c in [(0, 0, 0, 0), (17, 3, 5, 2), (255, 15, 15, 1)]:
        h, w = divmod(patch, 16)
        assert img[0, c, h * 16 + p, w * 16 + q] == x[0, patch, (p * 16 + q) * 3 + c]


def test_rae_file_loads_strictly_and_a_renamed_key_is_refused(tmp_path):
    cfg = pixel_decoder_preset("rae-vitb", depth=2)  # the ViT-B shapes, 2 layers: small
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) for k, v in PixelDecoder(cfg).state_dict().items()}
    torch.save(state, tmp_path / "model.pt")  # the layout of RAE's extract_decoder.py
    with pytest.raises(WeightsError, match="matches no preset"):  # 2 layers: no published shape
        load_pixel_decoder(str(tmp_path / "model.pt"))
    full = pixel_decoder_preset("rae-vitb")
    with torch.device("meta"):
        shapes = PixelDecoder(full).state_dict()
    state = {k: torch.randn(v.shape) * 0.02 for k, v in shapes.items()}
    torch.save(state, tmp_path / "vitb.pt")
    model, loaded_cfg = load_pixel_decoder(str(tmp_path / "vitb.pt"))
    assert loaded_cfg == full
    assert torch.equal(
        model.decoder_pos_embed, state["decoder_pos_embed"]
    )  # loaded, not recomputed
    (tmp_path / "vitb.pt").unlink()  # 350 MB: keep the suite's disk use small
    state["decoder_layers.0.attention.attention.q.weight"] = state.pop(
        "decoder_layers.0.attention.attention.query.weight"
    )
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(WeightsError, match="does not match"):
        load_pixel_decoder(str(tmp_path / "renamed.pt"))


def test_view_pixels_are_the_crops_the_backbone_saw():
    recipe = ViewRecipe(views=4, seed=3)
    with load_image("digits", "", "digits/0005") as img:
        crop = adm_center_crop(to_rgb(img), 256)
    views = make_views(crop, 5, recipe)  # (4, 3, 224, 224) normalised
    mean, std = torch.tensor(recipe.mean).view(3, 1, 1), torch.tensor(recipe.std).view(3, 1, 1)
    for v in range(4):
        pixels = (
            torch.from_numpy(view_pixels(crop, 5, v, recipe)).permute(2, 0, 1)[None].float() / 255
        )
        small = torch.nn.functional.interpolate(
            pixels, size=(224, 224), mode="bicubic", antialias=recipe.antialias
        )
        assert (small[0] - (views[v] * std + mean)).abs().mean() < 0.02, v
    assert np.array_equal(view_pixels(crop, 5, 1, recipe), crop[:, ::-1])


def test_train_decoder_learns_the_digits(digits_val_store, tmp_path):
    cfg = TrainDecoderConfig(
        features=str(digits_val_store),
        out=str(tmp_path / "dec"),
        preset="tiny",
        steps=40,
        batch_size=16,
        lr=1e-3,
        num_workers=0,
        log_every=10,
        progress=False,
        device="cpu",
        noise_tau=0.0,
    )
    metrics = train_decoder(cfg)
    model, _ = load_pixel_decoder(str(tmp_path / "dec"))
    store = FeatureStore(digits_val_store)
    targets = TargetImages(store, 2).batch(np.arange(32), np.zeros(32, int))
    with torch.no_grad():
        pred = model(torch.from_numpy(store.features[0:32, 0]).float()).clamp(0, 1)
    mse = (pred - targets).pow(2).mean().item()
    baseline = (targets - targets.mean(0)).pow(2).mean().item()  # the mean image
    assert metrics["step"] == 40 and mse < 0.5 * baseline, (mse, baseline)
    with pytest.raises(FlatDinoError, match="extension points"):
        train_decoder(dataclasses.replace(cfg, out=str(tmp_path / "x"), perceptual_weight=0.1))


def test_unreadable_decoder_files_are_one_line_errors(tmp_path):
    (tmp_path / "notes.pt").write_text("not a torch file")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="not a readable state dict"):
        load_pixel_decoder(str(tmp_path / "notes.pt"))
    with pytest.raises(WeightsError, match="holds a list"):
        load_pixel_decoder(str(tmp_path / "list.pt"))
