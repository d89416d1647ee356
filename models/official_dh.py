"""The official DiT-DH checkpoints (noctrog/flatdino `decoder/dit_dh.py`, `model_type: dit_dh`) as
this project's DiTDH: a pure converter in the style of models/official.py, whose reader and block
mapping it shares (the official LightningDDTBlock holds the tensors of a LightningDiTBlock)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from .dit import rope_1d
from .dit_dh import DIT_DH_PRESETS, DiTDH, DiTDHConfig
from .official import (
    OfficialFormatError,
    Tree,
    _block,
    _describe,
    _not_a_config,
    _Reader,
    _require_all,
    cls_dim_from_shapes,
    finish_generator,
    generator_flow,
)

# The official DiTDHConfig settings flatdino implements (key -> allowed values, first the default).
DIT_DH_SETTINGS = {
    "patch_size": (None,),
    "use_qknorm": (False,),
    "use_swiglu": (True,),
    "use_rmsnorm": (True,),
    "wo_shift": (False,),
    "use_pos_embed": (True,),
}


def dit_dh_config_from_official(cfg: Mapping) -> DiTDHConfig:
    """Our DiTDHConfig from the official GeneratorConfig JSON with `model_type: dit_dh`."""
    try:
        _require_all(cfg, {"model_type": ("dit_dh",), "pred_type": ("v",)}, "generator")
        dh = cfg["dit_dh"]
        _require_all(dh, DIT_DH_SETTINGS, "DiT-DH")
        if dh["num_registers"] and dh["use_rope"]:
            raise OfficialFormatError(
                "the official DiT-DH has num_registers with use_rope, which its own forward "
                "pass fails on or tiles the RoPE table of input_size rows for; flatdino refuses it"
            )
        if not dh.get("class_dropout_prob"):
            raise OfficialFormatError(
                "the official DiT-DH was trained without label dropout: it has no null class "
                "row, and flatdino's generators always have one"
            )
        return DiTDHConfig(
            tokens=dh["input_size"],
            latent_dim=dh["in_channels"],
            dim=dh["encoder_dim"],
            depth=dh["encoder_depth"],
            heads=dh["encoder_heads"],
            dh_dim=dh["decoder_dim"],
            dh_depth=dh["decoder_depth"],
            dh_heads=dh["decoder_heads"],
            mlp_hidden_ratio=dh["mlp_ratio"],
            num_classes=dh["num_classes"],
            use_rope=dh["use_rope"],
            registers=dh["num_registers"],
            cls_dim=dh.get("in_cls_dim") or 0,
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise _not_a_config("GeneratorConfig", e) from e


def dit_dh_flow_from_official(cfg: Mapping) -> dict:
    """`generator_flow` of an official DiT-DH's GeneratorConfig JSON."""
    return generator_flow(cfg, cfg["dit_dh"], cfg["dit_dh"]["input_size"])


def is_dit_dh(tree: Tree) -> bool:
    """An official DiT-DH tree (it has the encoder's own embedder), not a LightningDiT's."""
    return "s_embedder/kernel" in tree


def dit_dh_config_from_shapes(tree: Tree) -> tuple[str, DiTDHConfig]:
    """The DiT-DH preset whose widths and depths the tensors have (heads are not in weights)."""
    try:
        latent_dim, dim = tree["s_embedder/kernel"].shape
        found = {
            "tokens": tree["pos_embed"].shape[-2],
            "latent_dim": latent_dim,
            "dim": dim,
            "dh_dim": tree["x_embedder/kernel"].shape[1],
            "depth": len({k.split("/")[1] for k in tree if k.startswith("encoder_blocks/")}),
            "dh_depth": len({k.split("/")[1] for k in tree if k.startswith("decoder_blocks/")}),
            "num_classes": tree["y_embedder/embedding_table/embedding"].shape[0] - 1,
            "registers": tree["reg_enc_tokens"].shape[1] if "reg_enc_tokens" in tree else 0,
            "use_rope": "enc_feat_rope/freqs_sin" in tree,
            "cls_dim": cls_dim_from_shapes(tree),
        }
    except KeyError as e:
        raise OfficialFormatError(f"not an official DiT-DH (no {e.args[0]!r})") from e
    sizes = ("dim", "depth", "dh_dim", "dh_depth")
    for name, preset in DIT_DH_PRESETS.items():
        if all(getattr(preset, k) == found[k] for k in sizes):
            rest = {k: v for k, v in found.items() if k not in sizes}
            return name, replace(preset, **rest)
    raise OfficialFormatError(
        f"the DiT-DH's shapes ({_describe(found)}) match no preset "
        f"({', '.join(DIT_DH_PRESETS)}) and the checkpoint has no config item to read the heads from"
    )


def _dit_block(r: _Reader, out: dict, ours: str, theirs: str) -> None:
    """One official LightningDiTBlock or LightningDDTBlock (the same tensors) -> our DiTBlock."""
    _block(r, out, ours, theirs, layer_norm=False)
    r.linear(out, f"{ours}.ada.1", f"{theirs}/adaLN_modulation/layers/1")


def convert_dit_dh(tree: Tree, cfg: DiTDHConfig) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Official DiTDH tree (`patch_size=None`, with or without a CLS token) -> (DiTDH state
    dict, latent mean/std or None)."""
    r, out = _Reader(tree, "the official DiT-DH"), {}
    r.linear(out, "embed", "s_embedder")
    r.linear(out, "head_embed", "x_embedder")
    if cfg.dim != cfg.dh_dim:  # the official code has no projector between equal widths
        r.linear(out, "project", "s_projector")
    out["pos"] = r.get("pos_embed")
    out["t_embed.W"] = r.get("t_embedder/W")
    r.linear(out, "t_embed.mlp.0", "t_embedder/mlp/layers/0")
    r.linear(out, "t_embed.mlp.2", "t_embedder/mlp/layers/2")
    out["y_embed.weight"] = r.get("y_embedder/embedding_table/embedding")
    if cfg.registers:
        out["registers"] = r.get("reg_enc_tokens")
        out["head_registers"] = r.get("reg_dec_tokens")
    if cfg.use_rope:
        for theirs, width, heads in (
            ("enc", cfg.dim, cfg.heads),
            ("dec", cfg.dh_dim, cfg.dh_heads),
        ):
            sin, cos = rope_1d(cfg.tokens, width // heads, cfg.rope_base)
            r.same(f"{theirs}_feat_rope/freqs_sin", sin)
            r.same(f"{theirs}_feat_rope/freqs_cos", cos)
    for i in range(cfg.depth):
        _dit_block(r, out, f"blocks.{i}", f"encoder_blocks/{i}")
    for i in range(cfg.dh_depth):
        _dit_block(r, out, f"head_blocks.{i}", f"decoder_blocks/{i}")
    r.norm(out, "final_norm", "final_layer/norm_final", bias=False)
    r.linear(out, "final_ada.1", "final_layer/adaLN_modulation/layers/1")
    r.linear(out, "out", "final_layer/linear")
    return finish_generator(r, out, tree, cfg, DiTDH, "the official DiT-DH")
