"""The trainer commands: train-vae and train-dit (run them under torchrun for DDP)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..models.dit import DIT_PRESETS
from ..models.pixel_decoder import PIXEL_DECODER_PRESETS
from ..models.vae import VAE_PRESETS
from ..pipeline.errors import FlatDinoError
from .options import (
    CkptEveryOpt,
    CompileOpt,
    ConfigOpt,
    DeviceOpt,
    GradClipOpt,
    GridDecoderOpt,
    KeepEveryOpt,
    LogEveryOpt,
    LogToOpt,
    MicroBatchOpt,
    ProgressOpt,
    ResumeOpt,
    SeedOpt,
    StopAfterOpt,
    WeightDecayOpt,
    config_with_overrides,
    fail,
)

VAEPreset = Enum("VAEPreset", {k: k for k in VAE_PRESETS}, type=str)  # choices from the registry
DiTPreset = Enum("DiTPreset", {k: k for k in DIT_PRESETS}, type=str)


class Recon(str, Enum):
    mse = "mse"
    huber = "huber"


def _train(config_cls: type, train, given: dict, config: Path | None, ctx: typer.Context) -> None:
    """Build the trainer's config (a saved --config, then the options typed), train, report."""
    try:
        cfg = config_with_overrides(config_cls, config, given, ctx)
        metrics = train(cfg)
    except FlatDinoError as e:
        fail(str(e))
    _report(cfg.out, metrics)


def _report(out: str, metrics: dict) -> None:
    """The command's last line: where the run stopped and its last losses."""
    shown = {k: v for k, v in metrics.items() if k in ("loss", "val_mse", "val_rel_err")}
    if not shown:
        typer.echo(f"{out}: at step {metrics.get('step')} already; nothing to do")
        return
    values = ", ".join(f"{k}={v:.4g}" for k, v in shown.items())
    typer.echo(f"{out}: done at step {metrics.get('step')}: {values}")


def _vae_presets_help() -> str:
    from ..models.vae import VAE_PRESETS, count_parameters

    counts = (f"{n} ({count_parameters(c)['total'] / 1e6:.1f}M)" for n, c in VAE_PRESETS.items())
    return "VAE preset, parameters at C=768: " + ", ".join(counts) + "."


def train_vae_cmd(
    ctx: typer.Context,
    features: Annotated[
        str,
        typer.Option(
            help="Train feature store (from extract-features). A local path or an s3:// / gs:// / az:// URL (`flatdino[cloud]`)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Run folder: config.json, log.txt, metrics.jsonl, checkpoints/, best/, pre-decay/."
        ),
    ],
    val_features: Annotated[
        str | None,
        typer.Option(
            help="Validation feature store; its loss selects best/. A local path or an s3:// / gs:// / az:// URL (`flatdino[cloud]`)."
        ),
    ] = None,
    preset: Annotated[VAEPreset, typer.Option(help=_vae_presets_help())] = VAEPreset(
        "flatdino-32x128"
    ),
    tokens: Annotated[
        int | None, typer.Option(min=1, help="Override T, the number of latent tokens.")
    ] = None,
    latent_dim: Annotated[
        int | None, typer.Option(min=1, help="Override d, the channels per token.")
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(min=1, help="Total optimiser steps (10% warmup, 10% decay unless set)."),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Total epochs; 50 -> 5/40/5 and 150 -> 5/123/22 warmup/stable/decay (paper Table 6).",
        ),
    ] = None,
    warmup_steps: Annotated[int | None, typer.Option(min=0, help="Warmup length in steps.")] = None,
    decay_steps: Annotated[
        int | None, typer.Option(min=0, help="Cosine decay length in steps.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Global batch size (paper: 512).")] = 512,
    micro_batch: MicroBatchOpt = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (paper: 1e-4).")] = 1e-4,
    weight_decay: WeightDecayOpt = 0.02,
    grad_clip: GradClipOpt = 1.0,
    beta: Annotated[
        float | None, typer.Option(help="KL weight; default 1e-6 * 512 / (T * d) (paper Table 4).")
    ] = None,
    recon: Annotated[
        Recon,
        typer.Option(help="Reconstruction loss: mse (paper) or huber (delta 1, the public code)."),
    ] = Recon.mse,
    seed: SeedOpt = 0,
    num_workers: Annotated[int, typer.Option(min=0, help="Loader processes per rank.")] = 2,
    eval_every: Annotated[int, typer.Option(min=1, help="Validate every N steps.")] = 500,
    ckpt_every: CkptEveryOpt = 500,
    keep_every: KeepEveryOpt = 0,
    log_every: LogEveryOpt = 20,
    device: DeviceOpt = "auto",
    compile: CompileOpt = False,
    resume: ResumeOpt = False,
    stop_after: StopAfterOpt = None,
    resume_from: Annotated[
        Path | None,
        typer.Option(
            help="Continue from this checkpoint, e.g. RUN/pre-decay with a longer --steps to extend a run."
        ),
    ] = None,
    log_to: LogToOpt = "auto",
    decoder: GridDecoderOpt = None,
    grid_images: Annotated[
        int, typer.Option(min=0, help="Fixed val images in that grid (0: no grid).")
    ] = 8,
    config: ConfigOpt = None,
    progress: ProgressOpt = True,
) -> None:
    given = {k: v for k, v in locals().items() if k not in ("config", "ctx")}  # the options
    from ..trainers.train_vae import TrainVAEConfig, train_vae

    _train(TrainVAEConfig, train_vae, given, config, ctx)


def _dit_presets_help() -> str:
    from ..models.dit import count_dit_parameters

    counts = (f"{n} ({count_dit_parameters(c) / 1e6:.1f}M)" for n, c in DIT_PRESETS.items())
    return (
        "LightningDiT preset, parameters on 32x128 latents: "
        + ", ".join(counts)
        + ". T, d and the class count are read from --latents."
    )


class TimeDist(str, Enum):
    uniform = "uniform"
    logit_normal = "logit-normal"


def train_dit_cmd(
    ctx: typer.Context,
    latents: Annotated[
        str,
        typer.Option(
            help="Latents store (from encode-latents). A local path or an s3:// / gs:// / az:// URL (`flatdino[cloud]`)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Run folder: config.json, log.txt, metrics.jsonl, checkpoints/ (model, EMA, latent stats, flow.json)."
        ),
    ],
    preset: Annotated[DiTPreset, typer.Option(help=_dit_presets_help())] = DiTPreset("dit-xl"),
    steps: Annotated[int | None, typer.Option(min=1, help="Total optimiser steps.")] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Total epochs over the valid images (or --steps).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Global batch size (paper: 1024).")] = 1024,
    micro_batch: MicroBatchOpt = None,
    lr: Annotated[float, typer.Option(help="Constant learning rate (paper: 2e-4).")] = 2e-4,
    warmup_steps: Annotated[
        int, typer.Option(min=0, help="Linear warmup from 1e-6 over N steps (0: none).")
    ] = 0,
    weight_decay: WeightDecayOpt = 0.0,
    grad_clip: GradClipOpt = 1.0,
    ema_decay: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="EMA decay of the weights (kept in fp32).")
    ] = 0.9995,
    kappa: Annotated[
        float, typer.Option(min=1.0, help="Time shift t' = t/(k-(k-1)t); 1 is no shift.")
    ] = 3.0,
    time_dist: Annotated[
        TimeDist, typer.Option(help="Distribution of t before the shift.")
    ] = TimeDist.uniform,
    class_dropout: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Probability a label becomes the null class (CFG)."),
    ] = 0.1,
    normalize: Annotated[
        bool,
        typer.Option(
            "--normalize", help="Standardise latents per (token, dim) with the store's statistics."
        ),
    ] = False,
    views: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Train on the first K stored views only (1: view 0, no flips); default: all stored views.",
        ),
    ] = None,
    seed: SeedOpt = 0,
    ckpt_every: CkptEveryOpt = 5000,
    keep_every: KeepEveryOpt = 0,
    log_every: LogEveryOpt = 100,
    device: DeviceOpt = "auto",
    compile: CompileOpt = False,
    resume: ResumeOpt = False,
    stop_after: StopAfterOpt = None,
    log_to: LogToOpt = "auto",
    sample_every: Annotated[
        int,
        typer.Option(
            min=0,
            help="Every N steps, with the EMA weights: a grid of 8 classes x 8 from fixed noise "
            "and FD-DINOv2 of --fd-samples samples against --fd-features, logged as fd_dinov2 "
            "(0: off). Needs the VAE the latents came from.",
        ),
    ] = 5000,
    fd_samples: Annotated[
        int, typer.Option(min=2, help="Class-balanced samples (fixed noise) of that FD.")
    ] = 1000,
    fd_features: Annotated[
        Path | None,
        typer.Option(
            help="Reference feature store of that FD; default: the one the latents were encoded from."
        ),
    ] = None,
    fd_reference: Annotated[
        int,
        typer.Option(
            min=2,
            help="At most this many reference rows (whole blocks spread evenly over the store).",
        ),
    ] = 10_000,
    sample_steps: Annotated[int, typer.Option(min=1, help="Euler steps of those samples.")] = 50,
    sample_cfg: Annotated[
        float, typer.Option(min=1.0, help="Their guidance weight (1: none, one pass per step).")
    ] = 1.0,
    best_by_fd: Annotated[
        bool,
        typer.Option(
            "--best-by-fd", help="Keep RUN/best/ (a full checkpoint) at the lowest FD so far."
        ),
    ] = False,
    decoder: GridDecoderOpt = None,
    config: ConfigOpt = None,
    progress: ProgressOpt = True,
) -> None:
    given = {k: v for k, v in locals().items() if k not in ("config", "ctx")}  # the options
    from ..trainers.train_dit import TrainDiTConfig, train_dit

    _train(TrainDiTConfig, train_dit, given, config, ctx)


def _decoder_presets_help() -> str:
    from ..models.pixel_decoder import (
        PIXEL_DECODER_PRESETS,
        count_pixel_decoder_parameters,
    )

    counts = (
        f"{n} ({count_pixel_decoder_parameters(c) / 1e6:.1f}M)"
        for n, c in PIXEL_DECODER_PRESETS.items()
    )
    return (
        "Pixel decoder preset (RAE's ViT decoders; rae-vitxl is the published one): "
        + ", ".join(counts)
        + "."
    )


DecoderPreset = Enum("DecoderPreset", {k: k for k in PIXEL_DECODER_PRESETS}, type=str)


def train_decoder_cmd(
    ctx: typer.Context,
    features: Annotated[
        Path, typer.Option(help="Feature store; the images are read back through its manifest.")
    ],
    out: Annotated[
        Path, typer.Option(help="Run folder: config.json, log.txt, metrics.jsonl, checkpoints/.")
    ],
    preset: Annotated[DecoderPreset, typer.Option(help=_decoder_presets_help())] = DecoderPreset(
        "rae-vitxl"
    ),
    steps: Annotated[
        int | None,
        typer.Option(min=1, help="Total optimiser steps (10% warmup, 10% cosine decay)."),
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Total epochs (or --steps).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Global batch size.")] = 256,
    micro_batch: MicroBatchOpt = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-4,
    warmup_steps: Annotated[
        int | None, typer.Option(min=0, help="Warmup from 1e-6, in steps (default 10%).")
    ] = None,
    decay_steps: Annotated[
        int | None, typer.Option(min=0, help="Cosine decay to 1e-8, in steps (default 10%).")
    ] = None,
    weight_decay: WeightDecayOpt = 0.0,
    noise_tau: Annotated[
        float, typer.Option(min=0.0, help="Feature noise sigma ~ U(0, tau) per sample (RAE: 0.8).")
    ] = 0.8,
    l1_weight: Annotated[float, typer.Option(min=0.0, help="Weight of the L1 pixel loss.")] = 1.0,
    mse_weight: Annotated[float, typer.Option(min=0.0, help="Weight of the MSE pixel loss.")] = 1.0,
    grad_clip: GradClipOpt = 1.0,
    seed: SeedOpt = 0,
    num_workers: Annotated[int, typer.Option(min=0, help="Feature loader processes per rank.")] = 2,
    image_threads: Annotated[int, typer.Option(min=1, help="Threads decoding target images.")] = 4,
    ckpt_every: CkptEveryOpt = 500,
    keep_every: KeepEveryOpt = 0,
    log_every: LogEveryOpt = 20,
    device: DeviceOpt = "auto",
    compile: CompileOpt = False,
    resume: ResumeOpt = False,
    stop_after: StopAfterOpt = None,
    log_to: LogToOpt = "auto",
    grid_every: Annotated[
        int,
        typer.Option(
            min=0,
            help="Every N steps, reconstructions of fixed images beside their targets (0: off).",
        ),
    ] = 500,
    grid_images: Annotated[int, typer.Option(min=0, help="Images in that grid.")] = 8,
    config: ConfigOpt = None,
    progress: ProgressOpt = True,
) -> None:
    given = {k: v for k, v in locals().items() if k not in ("config", "ctx")}  # the options
    from ..trainers.train_decoder import TrainDecoderConfig, train_decoder

    _train(TrainDecoderConfig, train_decoder, given, config, ctx)
