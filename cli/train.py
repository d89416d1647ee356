"""The trainer commands, generated from their configs (trainers/configs.py): train-vae, train-dit
and train-decoder (run them under torchrun for DDP). The trainer is imported when the command
runs, so --help needs no torch."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import typer

from ..trainers.configs import TrainDecoderConfig, TrainDiTConfig, TrainVAEConfig
from .generate import config_command
from .options import ConfigOpt, config_with_overrides


def _report(out: str, metrics: dict) -> None:
    """The command's last line: where the run stopped and its last losses."""
    shown = {k: v for k, v in metrics.items() if k in ("loss", "val_mse", "val_rel_err")}
    if not shown:
        typer.echo(f"{out}: at step {metrics.get('step')} already; nothing to do")
        return
    values = ", ".join(f"{k}={v:.4g}" for k, v in shown.items())
    typer.echo(f"{out}: done at step {metrics.get('step')}: {values}")


def _train_vae(cfg: TrainVAEConfig) -> dict:
    from ..trainers.train_vae import train_vae

    return train_vae(cfg)


def _train_dit(cfg: TrainDiTConfig) -> dict:
    from ..trainers.train_dit import train_dit

    return train_dit(cfg)


def _train_decoder(cfg: TrainDecoderConfig) -> dict:
    from ..trainers.train_decoder import train_decoder

    return train_decoder(cfg)


def trainer_command(config_cls: type, train) -> object:
    """A trainer command: the config's options and --config (a saved config.json, then the
    options typed on top), the trainer, and its last line."""
    config = inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOpt
    )

    def body(ctx: typer.Context, values: dict, config: Path | None) -> None:
        cfg = config_with_overrides(config_cls, config, values, ctx)
        _report(cfg.out, train(cfg))

    return config_command(config_cls, body, extra=[config])


train_vae_cmd = trainer_command(TrainVAEConfig, _train_vae)
train_dit_cmd = trainer_command(TrainDiTConfig, _train_dit)
train_decoder_cmd = trainer_command(TrainDecoderConfig, _train_decoder)


def _run_kind(run: Path, config: dict, model: dict) -> str:
    """dit, decoder or vae: which trainer wrote this run or checkpoint folder."""
    if "latents" in config.get("train", {}) or (run / "flow.json").exists():
        return "dit"
    return "decoder" if "patch_size" in model else "vae"


def run_info(run: Path, as_json: bool) -> None:
    """Model config and parameter count, last metrics and checkpoints of a run folder."""
    from ..models.dit import DiTConfig, count_dit_parameters
    from ..models.pixel_decoder import PixelDecoderConfig, count_pixel_decoder_parameters
    from ..models.vae import VAEConfig, count_parameters

    config = json.loads((run / "config.json").read_text())
    model = config.get("model", config)  # a run folder, or a checkpoint folder (model config only)
    kind = _run_kind(run, config, model)
    count = {
        "dit": lambda: count_dit_parameters(DiTConfig(**model)),
        "decoder": lambda: count_pixel_decoder_parameters(PixelDecoderConfig(**model)),
        "vae": lambda: count_parameters(VAEConfig(**model)),
    }[kind]
    try:
        params = count()
    except (TypeError, ValueError) as e:  # a config of an older model layout: still readable
        params = f"unknown: the config is of an older {kind} layout ({e})"
    summary = {
        "path": str(run),
        "kind": kind,
        "model": model,
        "parameters": params,
        "checkpoints": sorted(p.name for p in run.iterdir() if (p / "model.safetensors").exists()),
    }
    if (run / "metrics.jsonl").exists():
        lines = (run / "metrics.jsonl").read_text().splitlines()
        summary["last_metrics"] = json.loads(lines[-1]) if lines else None
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        typer.echo(f"{key}: {value}")
