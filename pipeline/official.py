"""`flatdino import-official`: an official FlatDINO orbax checkpoint -> one of our checkpoint folders.

The official trainers (noctrog/flatdino `train.py`, `train_generator.py`) write an orbax
CheckpointManager folder: `ROOT/STEP/ITEM/`, with the VAE's items `encoder` and `decoder`, the
generator's `model` and `model_ema`, and a JSON `config` item beside them (plus `optim` and
`loader`, which are not read). The weights are converted by `flatdino.models.official` and written
as our own folder (config.json + safetensors), so `encode-latents`, `sample` and the evaluations
take it as they take a folder of `train-vae` or `train-dit`. Reading orbax needs the optional
extra `flatdino[official]` (orbax-checkpoint, which brings jax); nothing else does.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from safetensors.torch import save_file

from ..models.dit import DIT_PRESETS, DiTConfig
from ..models.dit_dh import DIT_DH_PRESETS, DiTDHConfig, count_generator_parameters
from ..models.flow import LatentNorm
from ..models.official import (
    OfficialFormatError,
    convert_dit,
    convert_vae,
    dit_config_from_official,
    dit_config_from_shapes,
    dit_flow_from_official,
    flatten,
    vae_config_from_official,
    vae_config_from_shapes,
)
from ..models.official_dh import (
    convert_dit_dh,
    dit_dh_config_from_official,
    dit_dh_config_from_shapes,
    dit_dh_flow_from_official,
    is_dit_dh,
)
from ..models.vae import VAE_PRESETS, count_parameters
from .checkpoints import resolve_vae
from .configs import ImportConfig
from .errors import FlatDinoError

log = logging.getLogger(__name__)

MARKER = "official.json"  # what an imported folder records, and what --overwrite looks for
VAE_ITEMS, DIT_ITEMS = ("encoder", "decoder"), ("model", "model_ema")


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise FlatDinoError(
            "reading an official orbax checkpoint needs orbax; install the extra with "
            "pip install 'flatdino[official]'"
        ) from e
    return ocp


def step_folder(path: Path, step: int | None) -> Path:
    """The folder that holds the items: PATH itself, or PATH/STEP (the latest or --step)."""
    if not path.is_dir():
        raise FlatDinoError(
            f"checkpoint {str(path)!r} is not a folder; pass an official orbax "
            "checkpoint folder (ROOT or ROOT/STEP)"
        )
    steps = sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())
    if step is not None:
        if step not in steps:
            raise FlatDinoError(
                f"checkpoint {str(path)!r} has no step {step}; it has "
                f"{steps or 'no numbered steps'}"
            )
        return path / str(step)
    if _items(path):
        return path
    if steps:
        return path / str(steps[-1])
    raise FlatDinoError(
        f"{str(path)!r} is not an official FlatDINO checkpoint: expected item folders "
        f"({', '.join(VAE_ITEMS)} for the VAE, {', '.join(DIT_ITEMS)} for the generator) or "
        "numbered step folders holding them"
    )


def _items(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_dir()} & {*VAE_ITEMS, *DIT_ITEMS}


def read_config(folder: Path) -> dict | None:
    """The official `config` item (orbax JsonSave: config/metadata), or None when absent."""
    path = folder / "config" / "metadata"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FlatDinoError(f"{str(path)!r} is not readable JSON ({e})") from e


def read_item(folder: Path, item: str) -> dict:
    """One PyTree item as a flat {"a/b/c": numpy array} (restored on the CPU, no target needed)."""
    ocp = _orbax()
    try:
        with warnings.catch_warnings():  # "sharding info not provided": one CPU, no mesh, fine
            warnings.simplefilter("ignore", UserWarning)
            tree = ocp.PyTreeCheckpointer().restore((folder / item).absolute())
    except Exception as e:  # orbax raises many types for a damaged or foreign item
        raise FlatDinoError(
            f"{str(folder / item)!r} is not a readable orbax item "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from e
    return flatten(tree)


def _write_folder(out: Path, files: dict, overwrite: bool) -> None:
    """All files into a temporary sibling, then one rename: a killed import leaves no half folder."""
    if out.exists():
        if not overwrite:
            raise FlatDinoError(f"--out {str(out)!r} exists; pass --overwrite to replace it")
        if not (out / MARKER).exists():
            raise FlatDinoError(
                f"--out {str(out)!r} is not a folder of `flatdino import-official` "
                "(no official.json); refusing to delete it"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        for name, content in files.items():
            if isinstance(content, dict):  # tensors
                save_file({k: v.contiguous() for k, v in content.items()}, str(tmp / name))
            else:
                (tmp / name).write_text(content)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def import_official(cfg: ImportConfig) -> dict:
    """Convert the checkpoint `cfg.checkpoint` and write `cfg.out`; returns a summary."""
    folder = step_folder(Path(cfg.checkpoint), cfg.step)
    items = _items(folder)
    official = read_config(folder)
    source = {"checkpoint": str(folder.resolve()), "items": sorted(items)}
    try:
        if set(VAE_ITEMS) <= items:
            if cfg.vae:
                raise FlatDinoError("--vae is for a generator checkpoint; this one is a VAE")
            return _import_vae(cfg, folder, official, source)
        if "model" in items or "model_ema" in items:
            return _import_dit(cfg, folder, official, source, items)
    except OfficialFormatError as e:
        raise FlatDinoError(f"{str(folder)!r}: {e}") from e
    raise FlatDinoError(
        f"{str(folder)!r} is not an official FlatDINO checkpoint: it holds "
        f"{sorted(p.name for p in folder.iterdir()) or 'nothing'}; expected the items "
        f"{' + '.join(VAE_ITEMS)} (VAE) or {' / '.join(DIT_ITEMS)} (generator)"
    )


def _preset_name(presets: dict, cfg) -> str:
    """The preset the imported architecture is (its init aside), else "custom"."""
    same = (lambda p: replace(p, init=cfg.init)) if hasattr(cfg, "init") else (lambda p: p)
    return next((n for n, p in presets.items() if same(p) == cfg), "custom")


def _generator_config(
    official: dict | None, tree: dict
) -> tuple[str, DiTConfig | DiTDHConfig, dict, Callable]:
    """(preset, config, flow settings, converter) of an official generator: a LightningDiT or,
    by its config's model_type or its tensors, a DiT-DH."""
    dh = official.get("model_type") == "dit_dh" if official is not None else is_dit_dh(tree)
    convert = convert_dit_dh if dh else convert_dit
    if official is not None:
        model_cfg = (dit_dh_config_from_official if dh else dit_config_from_official)(official)
        flow = (dit_dh_flow_from_official if dh else dit_flow_from_official)(official)
        return (
            _preset_name(DIT_DH_PRESETS if dh else DIT_PRESETS, model_cfg),
            model_cfg,
            flow,
            convert,
        )
    preset, model_cfg = (dit_dh_config_from_shapes if dh else dit_config_from_shapes)(tree)
    flow = {"kappa": 1.0, "class_dropout": 0.1, "normalize": False}
    log.warning("no config item: κ = 1 (no time shift) and class dropout 0.1 are assumed")
    return preset, model_cfg, flow, convert


def _import_vae(cfg: ImportConfig, folder: Path, official: dict | None, source: dict) -> dict:
    tree = {f"{item}/{k}": v for item in VAE_ITEMS for k, v in read_item(folder, item).items()}
    if official is not None:
        model_cfg = vae_config_from_official(official)
        preset = _preset_name(VAE_PRESETS, model_cfg)
    else:
        preset, model_cfg = vae_config_from_shapes(tree)
    state = convert_vae(tree, model_cfg)
    params = count_parameters(model_cfg)
    summary = {"kind": "vae", "preset": preset, "parameters": params, **source}
    _write_folder(
        Path(cfg.out),
        {
            "model.safetensors": state,
            "config.json": json.dumps(model_cfg.to_dict(), indent=2),
            MARKER: json.dumps(summary, indent=2),
        },
        cfg.overwrite,
    )
    log.info("imported the official VAE (%.1fM parameters) into %s", params["total"] / 1e6, cfg.out)
    return summary


def _import_dit(
    cfg: ImportConfig, folder: Path, official: dict | None, source: dict, items: set[str]
) -> dict:
    trees = {item: read_item(folder, item) for item in DIT_ITEMS if item in items}
    first = next(iter(trees.values()))
    preset, model_cfg, flow, convert = _generator_config(official, first)
    states = {item: convert(tree, model_cfg) for item, tree in trees.items()}
    raw, stats = states.get("model", states.get("model_ema"))
    ema, _ = states.get("model_ema", (raw, stats))
    if "model_ema" not in states:
        log.warning("the checkpoint has no model_ema item: ema.safetensors holds the raw weights")
    norm = (
        LatentNorm(stats["mean"], stats["std"])
        if stats
        else LatentNorm.identity(model_cfg.tokens, model_cfg.latent_dim)
    )
    vae = str(resolve_vae(cfg.vae).resolve()) if cfg.vae else None
    flow_json = {
        **flow,
        "time_dist": "uniform",
        "views": None,
        "latents": None,
        "latents_fingerprint": None,
        "vae_checkpoint": vae,
        "class_names": None,
        "official": source,
    }
    params = count_generator_parameters(model_cfg)
    summary = {"kind": "dit", "preset": preset, "parameters": params, "flow": flow, **source}
    _write_folder(
        Path(cfg.out),
        {
            "model.safetensors": raw,
            "ema.safetensors": ema,
            "latent_stats.safetensors": {"mean": norm.mean, "std": norm.std},
            "config.json": json.dumps(model_cfg.to_dict(), indent=2),
            "flow.json": json.dumps(flow_json, indent=2),
            MARKER: json.dumps(summary, indent=2),
        },
        cfg.overwrite,
    )
    log.info("imported the official generator (%.1fM parameters) into %s", params / 1e6, cfg.out)
    return summary
