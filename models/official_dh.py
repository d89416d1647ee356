"""The official DiT-DH checkpoints (noctrog/flatdino `decoder/dit_dh.py`, `model_type: dit_dh`) as
this project's DiTDH: a pure converter in the style of models/official.py, whose reader and block
mapping it shares (the official LightningDDTBlock holds the tensors of a LightningDiTBlock)."""

from __future__ import annotations

import torch

from .dit import rope_1d
from .dit_dh import DiTDH, DiTDHConfig
from .official import Tree, _block, _check_shapes, _Reader, _to_torch


def _dit_block(r: _Reader, out: dict, ours: str, theirs: str) -> None:
    """One official LightningDiTBlock or LightningDDTBlock (the same tensors) -> our DiTBlock."""
    _block(r, out, ours, theirs, layer_norm=False)
    r.linear(out, f"{ours}.ada.1", f"{theirs}/adaLN_modulation/layers/1")


def convert_dit_dh(tree: Tree, cfg: DiTDHConfig) -> dict[str, torch.Tensor]:
    """Official DiTDH tree (`patch_size=None`, no CLS token) -> DiTDH state dict."""
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
    r.check_all_used()
    state = _to_torch(out)
    with torch.device("meta"):
        expected = DiTDH(cfg).state_dict()
    _check_shapes(state, expected, "the official DiT-DH")
    return state
