"""`flatdino import-official` on what it cannot or need not convert: each official setting this
project cannot represent, each malformed config, tree or folder is refused in one line that names
it; a checkpoint without a config item or without model_ema, latent statistics, and the presets
recognised from tensor shapes alone give the state they should.

Small config dicts and trees (the committed toy fixtures of tests/data/official, or arrays of the
presets' shapes broadcast from one zero, so no memory) call the converters directly; the folder
paths run `import_official` on copies of the committed orbax checkpoints.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import npz_arrays, official_weights
from flatdino.models.configs import DIT_DH_PRESETS, DIT_PRESETS, VAE_PRESETS, DiTConfig
from flatdino.models.official import (
    OfficialFormatError,
    _check_shapes,
    convert_dit,
    dit_config_from_official,
    dit_config_from_shapes,
    dit_shapes,
    vae_config_from_official,
    vae_config_from_shapes,
    vae_shapes,
)
from flatdino.models.official_dh import (
    convert_dit_dh,
    dit_dh_config_from_official,
    dit_dh_config_from_shapes,
    is_dit_dh,
)
from flatdino.pipeline import official as pipeline
from flatdino.pipeline.configs import ImportConfig
from flatdino.pipeline.errors import FlatDinoError

DATA = Path(__file__).parent / "data" / "official"
VAE_STEP, DIT_STEP = DATA / "vae_ckpt" / "100", DATA / "dit_ckpt" / "200"


def _parity_tree(prefix: str) -> dict[str, np.ndarray]:
    """One toy model's flattened official tree in parity.npz."""
    ref = npz_arrays(DATA / "parity.npz")
    return {k[len(prefix) :]: v for k, v in ref.items() if k.startswith(prefix)}


def _vae_tree() -> dict[str, np.ndarray]:
    return _parity_tree("vae/")


def _dit_tree() -> dict[str, np.ndarray]:
    return _parity_tree("dit/")


def _dh_tree() -> dict[str, np.ndarray]:
    return official_weights(npz_arrays(DATA / "parity_dit_dh.npz"), "rope")


def _config(step: Path) -> dict:
    return json.loads((step / "config" / "metadata").read_text())


def _dh_config() -> dict:
    with np.load(DATA / "parity_dit_dh.npz") as f:
        return json.loads(str(f["rope/config"]))


def _with(cfg: dict, path: str, value) -> dict:
    """A deep copy of `cfg` with the key at "a/b/c" set to `value`."""
    out = json.loads(json.dumps(cfg))
    *parents, leaf = path.split("/")
    node = out
    for p in parents:
        node = node[p]
    node[leaf] = value
    return out


def _shaped(*shape: int) -> np.ndarray:
    return np.broadcast_to(np.float32(0), shape)  # the shape, no memory


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- the VAE config


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("encoder_disposable_registers", 4, "VAE has encoder_disposable_registers = 4"),
        ("intermediate_layer", 6, "VAE has intermediate_layer = 6"),
        ("encoder/use_cls", True, "VAE encoder has use_cls = True"),
        ("decoder/transformer/mlp_type", "gelu", "VAE decoder has mlp_type = 'gelu'"),
        ("encoder/use_pos_embeds", True, "VAE encoder has use_pos_embeds = True"),
        ("decoder/pos_embed_type", "sincos", "VAE decoder has pos_embed_type = 'sincos'"),
        ("decoder/transformer/mlp_hidden_dim", 100, "encoder and decoder MLP ratios differ"),
    ],
)
def test_official_vae_settings_it_cannot_represent_are_named(path, value, expected):
    with pytest.raises(OfficialFormatError) as e:
        vae_config_from_official(_with(_config(VAE_STEP), path, value))
    assert expected in _one_line(e)


@pytest.mark.parametrize(
    "cfg, expected",
    [
        ({}, "not an official FlatDinoConfig (no 'encoder')"),
        ({"encoder": {}, "decoder": {}}, "not an official FlatDinoConfig (no 'transformer')"),
        ({"encoder": None, "decoder": None}, "FlatDinoConfig (TypeError: 'NoneType' object"),
    ],
)
def test_a_config_that_is_no_flatdino_config_is_one_line(cfg, expected):
    with pytest.raises(OfficialFormatError) as e:
        vae_config_from_official(cfg)
    assert expected in _one_line(e)


# --------------------------------------------------------------------------- the VAE tensors


def test_vae_blocks_not_numbered_from_zero_are_refused():
    tree = {k.replace("encoder/blocks/0/", "encoder/blocks/1/"): v for k, v in _vae_tree().items()}
    with pytest.raises(OfficialFormatError) as e:
        vae_shapes(tree)
    assert _one_line(e) == "encoder/blocks are not numbered 0..n-1: [1]"


def test_a_tree_without_the_vae_norm_is_not_a_vae():
    tree = {k: v for k, v in _vae_tree().items() if k != "encoder/norm/norm/scale"}
    with pytest.raises(OfficialFormatError) as e:
        vae_shapes(tree)
    assert _one_line(e) == "not an official FlatDINO VAE (no 'encoder/norm/norm/scale')"


def _vae_shape_tree(cfg) -> dict[str, np.ndarray]:
    """The tensors `vae_shapes` reads, with the shapes the official VAE of `cfg` has."""
    tree = {
        "encoder/norm/norm/scale": _shaped(cfg.enc_dim),
        "decoder/norm/norm/scale": _shaped(cfg.dec_dim),
        "encoder/reg_tokens": _shaped(1, cfg.tokens, cfg.enc_dim),
        "decoder/reg_tokens": _shaped(1, cfg.num_patches, cfg.dec_dim),
    }
    if cfg.in_dim != cfg.enc_dim:  # the official code projects only between different widths
        tree["encoder/input_proj/kernel"] = _shaped(cfg.in_dim, cfg.enc_dim)
    if cfg.latent_dim != cfg.dec_dim:
        tree["decoder/input_proj/kernel"] = _shaped(cfg.latent_dim, cfg.dec_dim)
    parts = {"encoder": (cfg.enc_dim, cfg.enc_depth), "decoder": (cfg.dec_dim, cfg.dec_depth)}
    for part, (dim, depth) in parts.items():
        for i in range(depth):
            tree[f"{part}/blocks/{i}/mlp/up_proj/kernel"] = _shaped(dim, int(cfg.mlp_ratio * dim))
    return tree


@pytest.mark.parametrize("name", sorted(VAE_PRESETS))
def test_a_vae_of_a_preset_is_recognised_from_its_shapes(name):
    preset = VAE_PRESETS[name]
    assert vae_config_from_shapes(_vae_shape_tree(preset)) == (
        name,
        replace(preset, init="official"),
    )


def test_a_converted_state_that_misses_a_tensor_is_named():
    """The last guard of every converter: the state dict against the model's own (a tensor the
    converter does not write is a converter bug, never reached through the converters today)."""
    expected = {"out.weight": torch.zeros(2, 3), "out.bias": torch.zeros(2)}
    with pytest.raises(OfficialFormatError) as e:
        _check_shapes({"out.weight": torch.zeros(2, 3)}, expected, "the official VAE")
    assert _one_line(e) == "the official VAE gives no tensor for 'out.bias'"


# --------------------------------------------------------------------------- the generators


@pytest.mark.parametrize(
    "convert, cfg",
    [
        (dit_config_from_official, _with(_config(DIT_STEP), "dit/class_dropout_prob", 0.0)),
        (dit_dh_config_from_official, _with(_dh_config(), "dit_dh/class_dropout_prob", 0.0)),
    ],
    ids=["dit", "dit-dh"],
)
def test_a_generator_trained_without_label_dropout_is_refused(convert, cfg):
    with pytest.raises(OfficialFormatError) as e:
        convert(cfg)
    assert "trained without label dropout: it has no null class row" in _one_line(e)


@pytest.mark.parametrize(
    "convert, cfg, expected",
    [
        (dit_config_from_official, {}, "no 'dit'"),
        (dit_config_from_official, {"dit": {"class_dropout_prob": 0.1}}, "no 'transformer'"),
        (dit_dh_config_from_official, {"model_type": "dit_dh"}, "no 'dit_dh'"),
        (dit_config_from_official, {"dit": None}, "TypeError: 'NoneType' object is not"),
        (dit_dh_config_from_official, {"model_type": "dit_dh", "dit_dh": []}, "AttributeError: "),
    ],
)
def test_a_config_that_is_no_generator_config_is_one_line(convert, cfg, expected):
    with pytest.raises(OfficialFormatError) as e:
        convert(cfg)
    assert f"the config is not an official GeneratorConfig ({expected}" in _one_line(e)


@pytest.mark.parametrize(
    "shapes, key, expected",
    [
        (dit_shapes, "x_embedder/kernel", "not an official LightningDiT (no 'x_embedder/kernel')"),
        (dit_dh_config_from_shapes, "pos_embed", "not an official DiT-DH (no 'pos_embed')"),
    ],
)
def test_a_tree_without_a_generator_tensor_is_named(shapes, key, expected):
    tree = {k: v for k, v in (_dit_tree() if shapes is dit_shapes else _dh_tree()).items()}
    del tree[key]
    with pytest.raises(OfficialFormatError) as e:
        shapes(tree)
    assert _one_line(e) == expected


def test_a_dit_dh_tree_is_told_from_a_lightning_dit_by_its_encoder_embedder():
    assert is_dit_dh(_dh_tree()) and not is_dit_dh(_dit_tree())


def _dit_shape_tree(cfg: DiTConfig) -> dict[str, np.ndarray]:
    tree = {
        "x_embedder/kernel": _shaped(cfg.latent_dim, cfg.dim),
        "pos_embed": _shaped(1, cfg.tokens, cfg.dim),
        "y_embedder/embedding_table/embedding": _shaped(cfg.num_classes + 1, cfg.dim),
    }
    for i in range(cfg.depth):
        tree[f"blocks/{i}/mlp/up_proj/kernel"] = _shaped(cfg.dim, cfg.mlp_hidden)
    return tree


def _dh_shape_tree(cfg) -> dict[str, np.ndarray]:
    tree = {
        "s_embedder/kernel": _shaped(cfg.latent_dim, cfg.dim),
        "x_embedder/kernel": _shaped(cfg.latent_dim, cfg.dh_dim),
        "pos_embed": _shaped(1, cfg.tokens, cfg.dim),
        "y_embedder/embedding_table/embedding": _shaped(cfg.num_classes + 1, cfg.dim),
    }
    tree.update({f"encoder_blocks/{i}/mlp/up_proj/kernel": _shaped(1) for i in range(cfg.depth)})
    tree.update({f"decoder_blocks/{i}/mlp/up_proj/kernel": _shaped(1) for i in range(cfg.dh_depth)})
    if cfg.use_rope:
        tree["enc_feat_rope/freqs_sin"] = _shaped(cfg.tokens, cfg.dim // cfg.heads)
    if cfg.registers:
        tree["reg_enc_tokens"] = _shaped(1, cfg.registers, cfg.dim)
    return tree


@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
def test_a_dit_of_a_preset_is_recognised_from_its_shapes(name):
    """Heads are not in the weights: the preset of the width, depth and MLP gives them; the
    token count, latent width and classes are the tensors'."""
    preset = replace(DIT_PRESETS[name], tokens=16, latent_dim=12, num_classes=7)
    assert dit_config_from_shapes(_dit_shape_tree(preset)) == (
        name,
        replace(preset, init="official"),
    )


@pytest.mark.parametrize("name", sorted(DIT_DH_PRESETS))
@pytest.mark.parametrize("registers", [0, 2])
def test_a_dit_dh_of_a_preset_is_recognised_from_its_shapes(name, registers):
    preset = replace(
        DIT_DH_PRESETS[name], tokens=16, latent_dim=12, num_classes=7, registers=registers,
        use_rope=not registers,
    )  # fmt: skip
    assert dit_dh_config_from_shapes(_dh_shape_tree(preset)) == (name, preset)


@pytest.mark.parametrize("kind", ["dit", "dit-dh"])
def test_latent_statistics_in_the_tree_come_back_per_token(kind):
    """The official `latent_mean` / `latent_std` (compute_stats.py: one row per token) come back
    as the (T, d) statistics; one of the two alone is named."""
    if kind == "dit":
        tree, cfg, convert = _dit_tree(), dit_config_from_official(_config(DIT_STEP)), convert_dit
    else:
        tree, convert = _dh_tree(), convert_dit_dh
        cfg = dit_dh_config_from_official(_dh_config())
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(cfg.tokens, cfg.latent_dim)).astype(np.float32)
    std = rng.uniform(0.5, 2, size=(cfg.tokens, cfg.latent_dim)).astype(np.float32)
    state, stats = convert({**tree, "latent_mean": mean, "latent_std": std}, cfg)
    assert stats is not None and "latent_mean" not in state
    np.testing.assert_array_equal(stats["mean"].numpy(), mean)
    np.testing.assert_array_equal(stats["std"].numpy(), std)
    with pytest.raises(OfficialFormatError) as e:
        convert({**tree, "latent_mean": mean}, cfg)
    assert "has no 'latent_std'" in _one_line(e)


# --------------------------------------------------------------------------- folders and items


def test_step_folder_takes_the_named_step_or_a_folder_of_items():
    assert pipeline.step_folder(DIT_STEP.parent, 200) == DIT_STEP
    assert pipeline.step_folder(DIT_STEP, None) == DIT_STEP  # items right here: no step to pick


def test_a_checkpoint_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "ckpt.npz").write_bytes(b"")
    with pytest.raises(FlatDinoError) as e:
        pipeline.step_folder(tmp_path / "ckpt.npz", None)
    assert "is not a folder; pass an official orbax checkpoint folder" in _one_line(e)


def test_a_config_item_that_is_not_json_is_named(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "metadata").write_text("{not json")
    with pytest.raises(FlatDinoError) as e:
        pipeline.read_config(tmp_path)
    assert "metadata' is not readable JSON (Expecting property name" in _one_line(e)


def test_a_damaged_orbax_item_is_named(tmp_path):
    (tmp_path / "model").mkdir()  # an item folder orbax never wrote
    with pytest.raises(FlatDinoError) as e:
        pipeline.read_item(tmp_path, "model")
    assert f"{str(tmp_path / 'model')!r} is not a readable orbax item (" in _one_line(e)


def _import(ckpt: Path, out: Path, **kw) -> dict:
    return pipeline.import_official(ImportConfig(checkpoint=str(ckpt), out=str(out), **kw))


def test_vae_given_for_a_vae_checkpoint_is_refused(tmp_path):
    with pytest.raises(FlatDinoError) as e:
        _import(VAE_STEP, tmp_path / "o", vae=str(tmp_path))
    assert _one_line(e) == "--vae is for a generator checkpoint; this one is a VAE"
    assert not (tmp_path / "o").exists()


def test_half_a_vae_is_not_a_checkpoint(tmp_path):
    shutil.copytree(VAE_STEP, tmp_path / "ckpt", ignore=shutil.ignore_patterns("decoder"))
    with pytest.raises(FlatDinoError) as e:
        _import(tmp_path / "ckpt", tmp_path / "o")
    message = _one_line(e)
    assert "is not an official FlatDINO checkpoint: it holds" in message and "'encoder'" in message
    assert "expected the items encoder + decoder (VAE) or model / model_ema" in message


def test_a_config_item_of_another_layout_is_one_line_not_a_traceback(tmp_path):
    """A null part (here `dit_dh` of a DiT-DH config) once escaped as an AttributeError."""
    shutil.copytree(DIT_STEP, tmp_path / "ckpt")
    config = {**_config(DIT_STEP), "model_type": "dit_dh", "dit_dh": None}
    (tmp_path / "ckpt" / "config" / "metadata").write_text(json.dumps(config))
    with pytest.raises(FlatDinoError) as e:
        _import(tmp_path / "ckpt", tmp_path / "o")
    assert _one_line(e).endswith(
        "the config is not an official GeneratorConfig "
        "(AttributeError: 'NoneType' object has no attribute 'get')"
    )


def test_without_model_ema_the_raw_weights_are_the_ema(tmp_path, caplog):
    shutil.copytree(DIT_STEP, tmp_path / "ckpt", ignore=shutil.ignore_patterns("model_ema"))
    with caplog.at_level(logging.WARNING):
        summary = _import(tmp_path / "ckpt", tmp_path / "o")
    assert summary["items"] == ["model"]
    assert "no model_ema item: ema.safetensors holds the raw weights" in caplog.text
    raw = load_file(str(tmp_path / "o" / "model.safetensors"))
    ema = load_file(str(tmp_path / "o" / "ema.safetensors"))
    assert raw.keys() == ema.keys()
    for k in raw:
        torch.testing.assert_close(ema[k], raw[k], rtol=0, atol=0)


def test_a_generator_without_config_is_read_from_its_shapes(tmp_path, caplog, monkeypatch):
    """No config item: the shapes name the preset (here the toy one, registered for the test),
    κ = 1 and label dropout 0.1 are assumed and said, and the weights are those the config gives."""
    official = dit_config_from_official(_config(DIT_STEP))
    monkeypatch.setitem(DIT_PRESETS, "toy", replace(official, init="xavier"))
    shutil.copytree(DIT_STEP, tmp_path / "ckpt", ignore=shutil.ignore_patterns("config"))
    with caplog.at_level(logging.WARNING):
        summary = _import(tmp_path / "ckpt", tmp_path / "o")
    assert "no config item: κ = 1 (no time shift) and class dropout 0.1" in caplog.text
    assert summary["preset"] == "toy"
    assert summary["flow"] == {"kappa": 1.0, "class_dropout": 0.1, "normalize": False}
    assert json.loads((tmp_path / "o" / "config.json").read_text()) == official.to_dict()
    raw = load_file(str(tmp_path / "o" / "model.safetensors"))
    expected, _ = convert_dit(_dit_tree(), official)
    for k, v in expected.items():
        torch.testing.assert_close(raw[k], v, rtol=0, atol=0)


def test_a_dit_dh_without_config_is_read_from_its_shapes(monkeypatch, caplog):
    official = dit_dh_config_from_official(_dh_config())
    monkeypatch.setitem(DIT_DH_PRESETS, "toy", official)
    with caplog.at_level(logging.WARNING):
        preset, cfg, flow, convert = pipeline._generator_config(None, _dh_tree())
    assert (preset, cfg, convert) == ("toy", official, convert_dit_dh)
    assert flow == {"kappa": 1.0, "class_dropout": 0.1, "normalize": False}
    assert "no config item" in caplog.text


# --------------------------------------------------------------------------- writing --out


def _earlier_import(out: Path) -> None:
    out.mkdir()
    (out / pipeline.MARKER).write_text("{}")
    (out / "old.txt").write_text("earlier import")


def test_an_existing_out_needs_overwrite(tmp_path):
    _earlier_import(tmp_path / "o")
    with pytest.raises(FlatDinoError) as e:
        pipeline._write_folder(tmp_path / "o", {"new.txt": "x"}, overwrite=False)
    assert _one_line(e) == f"--out {str(tmp_path / 'o')!r} exists; pass --overwrite to replace it"
    assert (tmp_path / "o" / "old.txt").exists()


def test_overwrite_replaces_an_earlier_import_whole(tmp_path):
    _earlier_import(tmp_path / "o")
    files = {"new.txt": "x", pipeline.MARKER: "{}"}
    pipeline._write_folder(tmp_path / "o", files, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["new.txt", "official.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no temporary sibling left


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_an_import_killed_while_writing_leaves_the_earlier_folder(tmp_path, monkeypatch, error):
    _earlier_import(tmp_path / "o")

    def killed(*args, **kwargs):
        raise error("killed")

    monkeypatch.setattr(pipeline, "save_file", killed)
    files = {"new.txt": "x", "model.safetensors": {"w": torch.zeros(2)}}
    with pytest.raises(error, match="killed"):
        pipeline._write_folder(tmp_path / "o", files, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # the temporary sibling is gone
    assert (tmp_path / "o" / "old.txt").read_text() == "earlier import"
