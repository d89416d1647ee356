"""Finding and loading checkpoints for the downstream stages: run folders, checkpoint folders and
the published RAE decoder file. Models are rebuilt from the config.json saved beside their weights.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..models.dit import LightningDiT
from ..models.dit_dh import DiTDH, build_generator, generator_config
from ..models.flow import LatentNorm
from ..models.pixel_decoder import (
    PIXEL_DECODER_PRESETS,
    PixelDecoder,
    PixelDecoderConfig,
    pixel_decoder_preset,
)
from ..models.vae import FlatDinoVAE, VAEConfig
from .errors import FlatDinoError, MetadataError, WeightsError, json_object

# The kinds of run and checkpoint folders: their name in messages, the trainer that writes them,
# and the model config.json keys only that model has (a DiT's folder also holds flow.json).
RUN_KINDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "vae": ("VAE", "train-vae", ("enc_dim", "dec_dim")),
    "dit": ("DiT", "train-dit", ("rope_base", "mlp_hidden_ratio")),
    "decoder": ("pixel decoder", "train-decoder", ("patch_size", "mlp_dim")),
}


def config_kind(config: dict) -> tuple[str | None, str]:
    """(kind, the keys that tell it) of a parsed config.json: a checkpoint's model config, or a
    run folder's {"train": ..., "model": ...}; (None, "") when it is no model config of ours."""
    model = config["model"] if isinstance(config.get("model"), dict) else config
    for kind, (_, _, keys) in RUN_KINDS.items():
        if found := [k for k in keys if k in model]:
            return kind, "/".join(found)
    return None, ""


def describe_json(data: dict) -> str:
    """What a parsed JSON object is, for a message about a file of another kind."""
    kind, keys = config_kind(data)
    if kind is not None:
        return f"a {RUN_KINDS[kind][0]}'s config.json (it has {keys})"
    if "kappa" in data:
        return "a DiT's flow.json (it has kappa)"
    if "zarr_format" in data:
        return "a Zarr store's zarr.json"
    return f"no flatdino config (its keys: {', '.join(list(data)[:4]) or 'none'})"


def resolve_checkpoint(path: str, option: str, command: str) -> Path:
    """A checkpoint folder (model.safetensors + config.json): `path`, or RUN/best, RUN/checkpoints;
    one of another kind than `command` writes (a DiT run as --vae) is one line."""
    p = Path(path)
    if not p.exists():
        raise FlatDinoError(
            f"{option} {path!r} does not exist; pass the --out of `flatdino {command}`"
        )
    for candidate in (p, p / "best", p / "checkpoints"):
        if (candidate / "model.safetensors").exists() and (candidate / "config.json").exists():
            check_kind(candidate, option, path, command)
            return candidate
    raise FlatDinoError(
        f"{option} {path!r} holds no checkpoint (model.safetensors + config.json, or a run folder "
        f"with best/ or checkpoints/); pass the --out of `flatdino {command}`"
    )


def check_kind(ckpt: Path, option: str, path: str, command: str) -> dict:
    """The model config.json of checkpoint folder `ckpt`, refused in one line when it is damaged
    or of another kind's model than `command` trains."""
    kind = next(k for k, (_, c, _) in RUN_KINDS.items() if c == command)
    name, fix = RUN_KINDS[kind][0], f"pass the --out of `flatdino {command}`"
    config = read_json(ckpt / "config.json", rewrite(command), f"a {name}'s config.json")
    found, keys = config_kind(config)
    if found == kind:
        return config
    flow = "; flow.json beside it" if (ckpt / "flow.json").exists() else ""
    what = describe_json(config) if found is None else f"a {RUN_KINDS[found][0]} checkpoint"
    raise MetadataError(
        f"{option} {path!r}: {str(ckpt / 'config.json')!r} is {what}"
        f"{f' (it has {keys}{flow})' if found else ''}, not a {name}'s; {fix}"
    )


def _unreadable(path: Path, e: Exception, fix: str) -> WeightsError:
    what = "is missing" if isinstance(e, FileNotFoundError) else "is truncated or corrupt"
    detail = "" if isinstance(e, FileNotFoundError) else f" ({type(e).__name__}: {e})"
    return WeightsError(f"{str(path)!r} {what}{detail}; {fix}")


def read_weights(path: Path, fix: str) -> dict[str, torch.Tensor]:
    """A safetensors file of ours; missing, truncated or corrupt is one line that says `fix`."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a damaged header or body
        raise _unreadable(path, e, fix) from e


def read_json(path: Path, fix: str, expected: str = "a flatdino config") -> dict:
    """A config.json / flow.json of ours: missing, empty, truncated or not a JSON object is one
    line that names the file, `expected` and `fix`."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raw = None
    except OSError as e:
        raise _unreadable(path, e, fix) from e
    return json_object(raw, str(path), expected, fix)


def read_torch(path: Path, fix: str):
    """trainer.pt (optimiser and loop state), weights only: never unpickles code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a bad pickle
        raise _unreadable(path, e, fix) from e


def rewrite(command: str) -> str:
    """The fix for a damaged file in the checkpoint of `command`."""
    return f"rewrite it with `flatdino {command}` (or pass an intact run or checkpoint folder)"


def resolve_vae(path: str) -> Path:
    """The VAE checkpoint folder of --vae: given, or RUN/best, or RUN/checkpoints."""
    return resolve_checkpoint(path, "--vae", "train-vae")


def _rebuild(ckpt: Path, model_cls, config_cls, weights: Path, fix: str, what: str):
    """The model of a config.json with its weights; a config or state dict of another layout (an
    older flatdino's, before the models became the official ones, or another model's) is one line."""
    config = read_json(ckpt / "config.json", fix)
    state = read_weights(weights, fix)
    try:
        model = model_cls(config_cls(**config))
        model.load_state_dict(state, strict=True)
    # TypeError: unknown keys; ValueError, AssertionError, ArithmeticError: sizes no model has (a
    # hand-edited config: 0 heads, heads that do not divide the width); RuntimeError: the weights
    except (TypeError, ValueError, AssertionError, ArithmeticError, RuntimeError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise FlatDinoError(
            f"{str(ckpt)!r} does not fit this flatdino's {what} ({detail}); checkpoints written "
            f"before the {what} became the official model's layout must be trained again (or "
            "official weights imported with `flatdino import-official`)"
        ) from e
    return model.eval().requires_grad_(False)


def load_vae(ckpt: Path) -> tuple[FlatDinoVAE, str]:
    """Rebuild the VAE from its config.json and load its weights; returns (model, file sha256)."""
    weights, fix = ckpt / "model.safetensors", rewrite("train-vae")
    model = _rebuild(ckpt, FlatDinoVAE, VAEConfig, weights, fix, "VAE")
    return model, vae_sha256(ckpt)


def vae_sha256(ckpt: Path) -> str:
    """sha256 of a checkpoint's model.safetensors: the VAE's identity in latents stores."""
    return hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()


_JSON_NAMES = {
    dict: "object",
    list: "list",
    str: "string",
    bool: "true/false",
    float: "number",
    int: "whole number",
    type(None): "null",
}


def _json_kinds(annotation) -> tuple[type, ...]:
    """The Python types a JSON value of a field annotated `annotation` may have: its types (the
    origin of a generic), None when optional, and int where a float is expected."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    parts = typing.get_args(annotation) if union else (annotation,)
    kinds = tuple(typing.get_origin(a) or a for a in parts)
    return kinds + ((int,) if float in kinds else ())


@dataclass(frozen=True)
class FlowRecord:
    """flow.json, saved beside every DiT checkpoint: how the model was trained and on what, for
    the sampler and for resume checks. Older files load with a missing field at its default."""

    kappa: float  # the time shift κ of training, used again by the sampler
    time_dist: str = "uniform"  # uniform | logit-normal
    class_dropout: float = 0.0  # 0: the null class never learned, so no classifier-free guidance
    normalize: bool = False  # latents standardised with latent_stats.safetensors
    views: int | None = None  # stored views trained on; None: a run from before --views
    latents: str | None = None  # the latents store's location, as given
    latents_fingerprint: dict | None = None  # its fingerprint (VAE sha256, features store, ...)
    vae_checkpoint: str | None = None  # the VAE the latents were encoded with
    class_names: list[str] | None = None
    official: dict | None = None  # `flatdino import-official`: where the weights came from

    @classmethod
    def from_json(cls, data: dict, source: str = "flow.json") -> FlowRecord:
        """The record of a parsed flow.json; keys this flatdino does not know are ignored."""
        if "kappa" not in data:
            raise MetadataError(
                f"{source} is {describe_json(data)}, not a DiT's flow.json (no kappa); "
                f"{rewrite('train-dit')}"
            )
        record = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        hints = typing.get_type_hints(cls)
        for name, value in record.items():  # a hand-edited file: its field named, no traceback
            kinds = _json_kinds(hints[name])
            if not isinstance(value, kinds):
                names = [_JSON_NAMES[k] for k in kinds if not (k is int and float in kinds)]
                raise MetadataError(
                    f"{source} has {name} {json.dumps(value)[:60]}, where a JSON "
                    f"{' or '.join(names)} belongs; "
                    f"{rewrite('train-dit')}"
                )
        return cls(**record)

    def to_json(self) -> dict:
        """The flow.json dict: every field in order, `official` only when set."""
        record = asdict(self)
        if record["official"] is None:
            del record["official"]
        return record

    def first_difference(self, other: FlowRecord, names: tuple[str, ...]) -> str | None:
        """The first of the fields `names` whose values differ, this record's views left out
        when it has none (a run from before --views)."""
        for name in names:
            if name == "views" and self.views is None:
                continue
            if getattr(self, name) != getattr(other, name):
                return name
        return None


def read_flow(path: Path, fix: str) -> FlowRecord:
    """A flow.json file as a FlowRecord; unreadable is one line that says `fix`."""
    return FlowRecord.from_json(read_json(path, fix, "a DiT's flow.json"), repr(str(path)))


def load_dit(
    path: str, ema: bool = True
) -> tuple[LightningDiT | DiTDH, FlowRecord, LatentNorm, Path]:
    """The generator (EMA or raw weights; a LightningDiT or a DiT-DH, as its config.json's `kind`
    says), its flow.json, its latent normalisation, and its folder."""
    ckpt = resolve_checkpoint(path, "--dit", "train-dit")
    if not (ckpt / "flow.json").exists():
        raise FlatDinoError(f"--dit {path!r} is not a train-dit checkpoint (no flow.json)")
    fix = rewrite("train-dit")
    weights = ckpt / ("ema.safetensors" if ema else "model.safetensors")
    model = _rebuild(ckpt, build_generator, generator_config, weights, fix, "DiT")
    stats = read_weights(ckpt / "latent_stats.safetensors", fix)
    norm = LatentNorm(stats["mean"], stats["std"])
    flow = read_flow(ckpt / "flow.json", fix)
    return model, flow, norm, ckpt


def _rae_preset(state: dict[str, torch.Tensor], source: str):
    """The preset whose shapes match a foreign RAE decoder state dict (heads are not in weights)."""
    try:
        dim, in_dim = state["decoder_embed.weight"].shape
        depth = len({k.split(".")[1] for k in state if k.startswith("decoder_layers.")})
        mlp = state["decoder_layers.0.intermediate.dense.weight"].shape[0]
        num_patches = state["decoder_pos_embed"].shape[1] - 1
    except (KeyError, IndexError) as e:
        raise WeightsError(
            f"{source} is not an RAE decoder state dict (missing {e}); pass RAE's "
            "decoders/dinov2/wReg_base/ViTXL_n08/model.pt or a train-decoder run folder"
        ) from e
    for name, cfg in PIXEL_DECODER_PRESETS.items():
        if (cfg.dim, cfg.depth, cfg.mlp_dim) == (dim, depth, mlp):
            return pixel_decoder_preset(name, in_dim=int(in_dim), num_patches=int(num_patches))
    raise WeightsError(
        f"{source} holds a decoder of width {dim}, depth {depth}, MLP {mlp}, which matches no preset "
        f"of {sorted(PIXEL_DECODER_PRESETS)}"
    )


def load_pixel_decoder(path: str):
    """A pixel decoder from a train-decoder run/checkpoint folder or an RAE `model.pt` file.

    RAE's file is a flat decoder state dict; it is read with weights_only=True and loaded with
    strict key matching, so a renamed or missing tensor is an error, never silently skipped.
    Returns (model in eval mode, its config).
    """
    p = Path(path)
    if p.is_file():
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # not a torch file, or one that needs unpickling code
            raise WeightsError(f"--decoder {path!r} is not a readable state dict: {e}") from e
        if not isinstance(state, dict):
            raise WeightsError(
                f"--decoder {path!r} holds a {type(state).__name__}, not a state dict"
            )
        cfg = _rae_preset(state, f"--decoder {path!r}")
    else:
        ckpt = resolve_checkpoint(path, "--decoder", "train-decoder")
        try:
            cfg = PixelDecoderConfig(**read_json(ckpt / "config.json", rewrite("train-decoder")))
        except TypeError as e:
            raise WeightsError(
                f"--decoder {path!r} is not a pixel decoder checkpoint ({e}); pass the --out of "
                "`flatdino train-decoder` or RAE's model.pt"
            ) from e
        state = read_weights(ckpt / "model.safetensors", rewrite("train-decoder"))
    model = PixelDecoder(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(
            f"--decoder {path!r} does not match the decoder architecture: {e}"
        ) from e
    return model.eval().requires_grad_(False), cfg
