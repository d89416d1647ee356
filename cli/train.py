"""The trainer commands, generated from their configs (trainers/configs.py): train-vae, train-dit
and train-decoder (run them under torchrun for DDP). The trainer is imported when the command
runs, so --help needs no torch."""

from __future__ import annotations

import inspect
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


def trainer_command(config_cls: type, train, command: str) -> object:
    """A trainer command: the config's options and --config (a saved config.json, then the
    options typed on top), the trainer, and its last line."""
    config = inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigOpt
    )

    def body(ctx: typer.Context, values: dict, config: Path | None) -> None:
        cfg = config_with_overrides(config_cls, config, values, ctx, command)
        _report(cfg.out, train(cfg))

    return config_command(config_cls, body, extra=[config])


train_vae_cmd = trainer_command(TrainVAEConfig, _train_vae, "train-vae")
train_dit_cmd = trainer_command(TrainDiTConfig, _train_dit, "train-dit")
train_decoder_cmd = trainer_command(TrainDecoderConfig, _train_decoder, "train-decoder")
