"""The official FlatDINO checkpoints (noctrog/flatdino, JAX / flax nnx) as this project's models.

Pure functions in timm's converter style: a flattened official parameter tree in (the nnx state
path joined with "/" -> array, e.g. `blocks/0/attention/qkv_proj/kernel`), a state dict out.
Kernels are (in, out) in flax and (out, in) in torch; the official qkv layout `(three heads c)` is
timm's, so the fused projection is copied as it is. The configs are read from the official
config JSON (`FlatDinoConfig` / `GeneratorConfig` as `asdict` wrote them) or, without one, from
the tensor shapes matched against the presets. What the official code can express and this
project does not (disposable registers, tanh latents, x-prediction, ...) is refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import torch

from .configs import DiTDHConfig
from .dit import DIT_PRESETS, DiTConfig, LightningDiT, rope_1d, sincos_1d
from .vae import VAE_PRESETS, VAEConfig, build_on_meta

Tree = Mapping[str, np.ndarray]

# nnx.Param counts of the official models at the presets' sizes (VAE: ViT-B encoder, ViT-L
# decoder; DiTs on 32 × 128 latents with 1000 classes), measured by building the official modules
# with nnx.eval_shape: tests/data/official/count_parameters.py. The tests hold our presets to them.
OFFICIAL_PARAMETERS: dict[str, int] = {
    "flatdino-32x128": 517_915_648,  # encoder 113_627_136 + decoder 404_288_512
    "flatdino-32x64": 517_751_808,  # encoder 113_528_832 + decoder 404_222_976
    "dit-s": 33_059_072,
    "dit-b": 130_703_744,
    "dit-l": 458_423_440,
    "dit-xl": 675_478_016,
    # train_generator.get_experiment("ditxl-dh"): tests/data/official/make_parity_dit_dh.py
    "dit-dh-xl": 835_058_132,
}


class OfficialFormatError(ValueError):
    """An official checkpoint this project cannot represent, or not an official checkpoint."""


def flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """A nested dict (an orbax restore of `nnx.to_pure_dict(state)`) -> {"a/b/0/c": array},
    without the RNG streams."""
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "/"))
        elif not is_rng_state(path):  # typed PRNG keys are not arrays, and not weights
            out[path] = np.asarray(value)
    return out


def is_rng_state(path: str) -> bool:
    """RNG streams (dropout, label dropout) live in the nnx state too; they are not weights."""
    return "rngs" in path.split("/")


def _blocks(tree: Tree, prefix: str) -> int:
    """How many `PREFIX/blocks/i/...` the tree holds."""
    ids = {int(k[len(prefix) :].split("/")[1]) for k in tree if k.startswith(prefix + "blocks/")}
    if ids != set(range(len(ids))):
        raise OfficialFormatError(f"{prefix}blocks are not numbered 0..n-1: {sorted(ids)}")
    return len(ids)


class _Reader:
    """Takes tensors out of an official tree, remembering what was used and checking shapes."""

    def __init__(self, tree: Tree, what: str):
        self.tree, self.what, self.used = tree, what, set()

    def get(self, path: str) -> np.ndarray:
        if path not in self.tree:
            raise OfficialFormatError(f"{self.what} has no {path!r}; is it an official checkpoint?")
        self.used.add(path)
        return np.asarray(self.tree[path], dtype=np.float32)

    def linear(self, out: dict, ours: str, theirs: str, bias: bool = True) -> None:
        out[f"{ours}.weight"] = self.get(f"{theirs}/kernel").T  # flax (in, out) -> torch (out, in)
        if bias:
            out[f"{ours}.bias"] = self.get(f"{theirs}/bias")

    def norm(self, out: dict, ours: str, theirs: str, bias: bool = True) -> None:
        """The official LayerNorm / RMSNorm wrapper holds its flax norm as `.norm`."""
        out[f"{ours}.weight"] = self.get(f"{theirs}/norm/scale")
        if bias:
            out[f"{ours}.bias"] = self.get(f"{theirs}/norm/bias")

    def same(self, path: str, expected: torch.Tensor) -> None:
        """A fixed buffer we recompute (sin-cos, RoPE tables): it must be the one we compute."""
        value = self.get(path).reshape(expected.shape)
        if not np.allclose(value, expected.numpy(), rtol=1e-5, atol=1e-5):
            raise OfficialFormatError(
                f"{self.what} {path!r} differs from the fixed table this model computes "
                "(another position scheme or RoPE base?)"
            )

    def check_all_used(self) -> None:
        left = sorted(k for k in self.tree if k not in self.used and not is_rng_state(k))
        if left:
            more = f" and {len(left) - 1} more" if len(left) > 1 else ""
            raise OfficialFormatError(
                f"{self.what} holds {left[0]!r}{more}, which this model has no place for"
            )


def _block(r: _Reader, out: dict, ours: str, theirs: str, layer_norm: bool) -> None:
    """One official TransformerDecoderLayer (or LightningDiTBlock) -> timm-style names."""
    r.norm(out, f"{ours}.norm1", f"{theirs}/att_norm", bias=layer_norm)
    r.linear(out, f"{ours}.attn.qkv", f"{theirs}/attention/qkv_proj")
    r.linear(out, f"{ours}.attn.proj", f"{theirs}/attention/o_proj")
    if layer_norm:  # the VAE's QK-norm: scale only, shared by the heads
        r.norm(out, f"{ours}.attn.q_norm", f"{theirs}/attention/q_norm", bias=False)
        r.norm(out, f"{ours}.attn.k_norm", f"{theirs}/attention/k_norm", bias=False)
    r.norm(out, f"{ours}.norm2", f"{theirs}/mlp_norm", bias=layer_norm)
    r.linear(out, f"{ours}.mlp.fc1_g", f"{theirs}/mlp/gate_proj")  # silu(gate(x)) * up(x)
    r.linear(out, f"{ours}.mlp.fc1_x", f"{theirs}/mlp/up_proj")
    r.linear(out, f"{ours}.mlp.fc2", f"{theirs}/mlp/down_proj")


def _to_torch(out: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in out.items()}  # own, writable memory


def _check_shapes(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str):
    """Every tensor where the model expects it, with its shape; one line for the first misfit."""
    missing = sorted(set(expected) - set(state))
    if missing:
        raise OfficialFormatError(f"{what} gives no tensor for {missing[0]!r}")
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise OfficialFormatError(
                f"{what}: {name} has shape {tuple(state[name].shape)}, the config expects "
                f"{tuple(ref.shape)}"
            )


# --------------------------------------------------------------------------- the VAE


def _not_a_config(what: str, e: Exception) -> OfficialFormatError:
    """A config JSON of another layout: the key it lacks, or the part of the wrong type."""
    why = f"no {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
    return OfficialFormatError(f"the config is not an official {what} ({why})")


def _require(cfg: Mapping, key: str, allowed, what: str) -> None:
    value = cfg.get(key, allowed[0])
    if value not in allowed:
        raise OfficialFormatError(
            f"the official {what} has {key} = {value!r}; flatdino implements {allowed[0]!r} only"
        )


def _require_all(cfg: Mapping, table: Mapping[str, tuple], what: str) -> None:
    """`_require` for each (key, allowed values) of a table; a missing key is its first value."""
    for key, allowed in table.items():
        _require(cfg, key, allowed, what)


# The official settings flatdino implements (key -> allowed values, the first is the default).
VAE_SETTINGS = {
    "encoder_disposable_registers": (0,),
    "decoder_disposable_registers": (0,),
    "tanh": (False,),
    "intermediate_layer": (None,),
}
VAE_VIT_SETTINGS = {"patch": (None,), "use_cls": (False,)}
VAE_BLOCK_SETTINGS = {
    "mlp_type": ("swiglu",),
    "norm_type": ("ln",),
    "qk_norm": (True,),
    "qkv_bias": (True,),
    "mlp_bias": (True,),
    "head_dim": (None,),
}
GENERATOR_SETTINGS = {"model_type": ("dit",), "pred_type": ("v",)}
DIT_SETTINGS = {
    "patch_embed": (None,),
    "num_registers": (0,),
    "wo_shift": (False,),
    "learn_sigma": (False,),
    "use_rope": (True,),
}
DIT_BLOCK_SETTINGS = {**VAE_BLOCK_SETTINGS, "norm_type": ("rms",), "qk_norm": (False,)}


def vae_config_from_official(cfg: Mapping) -> VAEConfig:
    """Our VAEConfig from the official FlatDinoConfig JSON (train.py's `asdict(cfg)`)."""
    try:
        enc, dec = cfg["encoder"], cfg["decoder"]
        et, dt = enc["transformer"], dec["transformer"]
        _require_all(cfg, VAE_SETTINGS, "VAE")
        for part, vit in (("encoder", enc), ("decoder", dec)):
            _require_all(vit, VAE_VIT_SETTINGS, f"VAE {part}")
            _require_all(vit["transformer"], VAE_BLOCK_SETTINGS, f"VAE {part}")
        _require(enc, "use_pos_embeds", (False,), "VAE encoder")
        _require(dec, "use_pos_embeds", (True,), "VAE decoder")
        _require(dec, "pos_embed_type", ("learned",), "VAE decoder")
        ratios = {et["mlp_hidden_dim"] / et["embed_dim"], dt["mlp_hidden_dim"] / dt["embed_dim"]}
        if len(ratios) != 1:
            raise OfficialFormatError(
                f"the official VAE's encoder and decoder MLP ratios differ ({sorted(ratios)}); "
                "flatdino has one mlp_ratio"
            )
        out_dim = enc["output_dim"] or et["embed_dim"]  # None: no projection, mu | logvar of D
        return VAEConfig(
            in_dim=enc["input_dim"] or et["embed_dim"],
            num_patches=dec["num_registers"],
            tokens=enc["num_registers"],
            latent_dim=out_dim // 2,
            enc_dim=et["embed_dim"],
            enc_depth=et["num_layers"],
            enc_heads=et["num_heads"],
            dec_dim=dt["embed_dim"],
            dec_depth=dt["num_layers"],
            dec_heads=dt["num_heads"],
            mlp_ratio=ratios.pop(),
            init="official",
        )
    except (KeyError, TypeError, AttributeError) as e:  # a missing key, a null or scalar part
        raise _not_a_config("FlatDinoConfig", e) from e


def vae_shapes(tree: Tree) -> dict:
    """The VAE's sizes read from its tensors (heads are not in the weights). A projection the
    official code leaves out (equal widths) means the input width is the model width."""
    try:
        enc_dim = tree["encoder/norm/norm/scale"].shape[0]
        dec_dim = tree["decoder/norm/norm/scale"].shape[0]
        enc_in, dec_in = (
            tree.get("encoder/input_proj/kernel"),
            tree.get("decoder/input_proj/kernel"),
        )
        return {
            "in_dim": enc_dim if enc_in is None else enc_in.shape[0],
            "enc_dim": enc_dim,
            "tokens": tree["encoder/reg_tokens"].shape[1],
            "latent_dim": dec_dim if dec_in is None else dec_in.shape[0],
            "dec_dim": dec_dim,
            "num_patches": tree["decoder/reg_tokens"].shape[1],
            "enc_depth": _blocks(tree, "encoder/"),
            "dec_depth": _blocks(tree, "decoder/"),
            "mlp_ratio": tree["encoder/blocks/0/mlp/up_proj/kernel"].shape[1] / enc_dim,
        }
    except KeyError as e:
        raise OfficialFormatError(f"not an official FlatDINO VAE (no {e.args[0]!r})") from e


def vae_config_from_shapes(tree: Tree) -> tuple[str, VAEConfig]:
    """The preset whose sizes the tensors have (its heads), or a one-line error naming both."""
    found = vae_shapes(tree)
    for name, preset in VAE_PRESETS.items():
        if all(getattr(preset, k) == v for k, v in found.items()):
            return name, replace(preset, init="official")
    presets = ", ".join(VAE_PRESETS)
    raise OfficialFormatError(
        f"the VAE's shapes ({_describe(found)}) match no preset ({presets}) and the checkpoint "
        "has no config item to read the heads from"
    )


def _describe(found: dict) -> str:
    return ", ".join(f"{k}={round(v, 3) if isinstance(v, float) else v}" for k, v in found.items())


def convert_vae(tree: Tree, cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Official `encoder/...` + `decoder/...` tree -> a FlatDinoVAE state dict."""
    r, out = _Reader(tree, "the official VAE"), {}
    widths = {
        "encoder": (cfg.in_dim, cfg.enc_dim, 2 * cfg.latent_dim),
        "decoder": (cfg.latent_dim, cfg.dec_dim, cfg.in_dim),
    }
    out["encoder.latent_tokens"] = r.get("encoder/reg_tokens")
    for part, depth in (("encoder", cfg.enc_depth), ("decoder", cfg.dec_depth)):
        w_in, width, w_out = widths[part]
        if w_in != width:  # the official code has no projection between equal widths
            r.linear(out, f"{part}.input_proj", f"{part}/input_proj", bias=False)
        for i in range(depth):
            _block(r, out, f"{part}.blocks.{i}", f"{part}/blocks/{i}", layer_norm=True)
        r.norm(out, f"{part}.norm", f"{part}/norm")
        if w_out != width:
            r.linear(out, f"{part}.output_proj", f"{part}/output_proj", bias=False)
    out["decoder.pos_embed"] = r.get("decoder/pos_embed")
    out["decoder.queries"] = r.get("decoder/reg_tokens")
    r.check_all_used()
    state = _to_torch(out)
    _check_shapes(state, build_on_meta(cfg).state_dict(), "the official VAE")
    return state


# --------------------------------------------------------------------------- the generator


def official_kappa(cfg: Mapping, size: int) -> float:
    """The time shift κ an official generator was trained with, `size` = T·d (train_generator.py):
    none without `time_dist_shift_base`, whatever `kappa` says; with it, `kappa` when set, else
    sqrt(T·d / time_dist_shift_base)."""
    base, kappa = cfg.get("time_dist_shift_base"), cfg.get("kappa")
    if not base:
        return 1.0
    return float(kappa) if kappa is not None else math.sqrt(size / base)


def generator_flow(cfg: Mapping, part: Mapping, tokens: int) -> dict:
    """κ (`official_kappa`), class dropout and latent normalisation of an official GeneratorConfig
    JSON of either kind: `part` is its `dit` or `dit_dh` item, `tokens` its T."""
    return {
        "kappa": official_kappa(cfg, tokens * part["in_channels"]),
        "class_dropout": float(part.get("class_dropout_prob", 0.0)),
        "normalize": bool(cfg.get("use_latent_norm", False)),
    }


def dit_flow_from_official(cfg: Mapping) -> dict:
    """`generator_flow` of an official LightningDiT's GeneratorConfig JSON."""
    return generator_flow(cfg, cfg["dit"], cfg["dit"]["num_patches"])


def dit_config_from_official(cfg: Mapping) -> DiTConfig:
    """Our DiTConfig from the official GeneratorConfig JSON (train_generator.py's `asdict(cfg)`)."""
    try:
        _require_all(cfg, GENERATOR_SETTINGS, "generator")
        dit = cfg["dit"]
        t = dit["transformer"]
        _require_all(dit, DIT_SETTINGS, "generator")
        _require_all(t, DIT_BLOCK_SETTINGS, "generator")
        if not dit.get("class_dropout_prob"):
            raise OfficialFormatError(
                "the official generator was trained without label dropout: it has no null class "
                "row, and flatdino's DiT always has one"
            )
        dim = t["embed_dim"]
        return DiTConfig(
            tokens=dit["num_patches"],
            latent_dim=dit["in_channels"],
            dim=dim,
            depth=t["num_layers"],
            heads=t["num_heads"],
            mlp_hidden_ratio=_ratio(t["mlp_hidden_dim"], dim),
            num_classes=dit["num_classes"],
            init="official",
            cls_dim=dit.get("in_cls_dim") or 0,
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise _not_a_config("GeneratorConfig", e) from e


def _ratio(hidden: int, dim: int) -> float:
    """8/3 when round(8D/3) is the hidden size (the presets' value), else hidden / D."""
    return 8 / 3 if round(8 / 3 * dim) == hidden else hidden / dim


def cls_dim_from_shapes(tree: Tree) -> int:
    """C of an official generator's CLS token (`in_cls_proj`), 0 without one."""
    return tree["in_cls_proj/kernel"].shape[0] if "in_cls_proj/kernel" in tree else 0


def convert_cls(r: _Reader, out: dict, cfg: DiTConfig | DiTDHConfig) -> None:
    """The CLS token's layers of either official generator, when the config has one."""
    if cfg.cls_dim:
        r.linear(out, "cls_embed", "in_cls_proj")
        r.linear(out, "cls_out", "out_cls_proj")


def dit_shapes(tree: Tree) -> dict:
    try:
        latent_dim, dim = tree["x_embedder/kernel"].shape
        return {
            "tokens": tree["pos_embed"].shape[-2],
            "latent_dim": latent_dim,
            "dim": dim,
            "depth": _blocks(tree, ""),
            "num_classes": tree["y_embedder/embedding_table/embedding"].shape[0] - 1,
            "mlp_hidden": tree["blocks/0/mlp/up_proj/kernel"].shape[1],
            "cls_dim": cls_dim_from_shapes(tree),
        }
    except KeyError as e:
        raise OfficialFormatError(f"not an official LightningDiT (no {e.args[0]!r})") from e


def dit_config_from_shapes(tree: Tree) -> tuple[str, DiTConfig]:
    found = dit_shapes(tree)
    for name, preset in DIT_PRESETS.items():
        if (
            preset.dim == found["dim"]
            and preset.depth == found["depth"]
            and (preset.mlp_hidden == found["mlp_hidden"])
        ):
            sizes = {k: found[k] for k in ("tokens", "latent_dim", "num_classes", "cls_dim")}
            return name, replace(preset, init="official", **sizes)
    raise OfficialFormatError(
        f"the generator's shapes ({_describe(found)}) match no preset ({', '.join(DIT_PRESETS)}) "
        "and the checkpoint has no config item to read the heads from"
    )


def convert_dit(tree: Tree, cfg: DiTConfig) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Official LightningDiT tree -> (LightningDiT state dict, latent mean/std or None)."""
    r, out = _Reader(tree, "the official generator"), {}
    r.linear(out, "embed", "x_embedder")
    r.same("pos_embed", sincos_1d(cfg.tokens, cfg.dim))
    out["t_embed.W"] = r.get("t_embedder/W")
    r.linear(out, "t_embed.mlp.0", "t_embedder/mlp/layers/0")
    r.linear(out, "t_embed.mlp.2", "t_embedder/mlp/layers/2")
    out["y_embed.weight"] = r.get("y_embedder/embedding_table/embedding")
    sin, cos = rope_1d(cfg.tokens, cfg.dim // cfg.heads, cfg.rope_base)
    r.same("feat_rope/freqs_sin", sin)
    r.same("feat_rope/freqs_cos", cos)
    for i in range(cfg.depth):
        _block(r, out, f"blocks.{i}", f"blocks/{i}", layer_norm=False)
        r.linear(out, f"blocks.{i}.ada.1", f"blocks/{i}/adaLN_modulation/layers/1")
    r.norm(out, "final_norm", "final_layer/norm_final", bias=False)
    r.linear(out, "final_ada.1", "final_layer/adaLN_modulation/layers/1")
    r.linear(out, "out", "final_layer/linear")
    return finish_generator(r, out, tree, cfg, LightningDiT, "the official generator")


def finish_generator(
    r: _Reader, out: dict, tree: Tree, cfg: DiTConfig | DiTDHConfig, model: type, what: str
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The end of either generator's conversion: its CLS layers, the latent mean/std the
    checkpoint holds (per token, or None), every leaf used, and the state's shapes checked
    against `model(cfg)`'s."""
    convert_cls(r, out, cfg)
    stats = None
    if "latent_mean" in tree or "latent_std" in tree:
        shape = (cfg.tokens, cfg.latent_dim)
        stats = {
            k: torch.from_numpy(np.broadcast_to(r.get(f"latent_{k}"), shape).copy())
            for k in ("mean", "std")
        }
    r.check_all_used()
    state = _to_torch(out)
    with torch.device("meta"):
        expected = model(cfg).state_dict()
    _check_shapes(state, expected, what)
    return state, stats
