"""The trainers' configs: `RunConfig` (what every trainer and the loop share) and one config per
trainer, each field an option of its command with its default and help (pipeline/options.py).

Saved as RUN/config.json ("train", flat); `--config FILE` reads it back. No torch here: the CLI
builds its options from these classes without importing a trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.configs import (
    GENERATOR_PRESETS,
    PIXEL_DECODER_PRESETS,
    VAE_PRESETS,
    generator_parameters,
    pixel_decoder_parameters,
    vae_parameters,
)
from ..pipeline.options import (
    DEVICE_HELP,
    DIST_TIMEOUT_HELP,
    PRECISION_HELP,
    PROGRESS_HELP,
    STORE_URL,
    flat_keywords,
    internal,
)
from ..pipeline.options import option as opt


@dataclass(frozen=True)
class RunConfig:
    """How long a trainer runs, its optimiser, and how it checkpoints and logs: the fields the
    three trainers share, read by trainers/run.py and the loop. Each trainer sets its own
    defaults (`default_factory`) and may word the help for its schedule (`helps`)."""

    steps: int | None = opt(None, min=1, help="Total optimiser steps.")
    epochs: int | None = opt(None, min=1, help="Total epochs (or --steps).")
    batch_size: int = opt(256, min=1, help="Global batch size.")  # all ranks, all micro steps
    micro_batch: int | None = opt(
        None, min=1, help="Per-device batch; smaller than batch/world means gradient accumulation."
    )
    lr: float = opt(2e-4, help="Peak learning rate.")
    weight_decay: float = opt(
        0.0, min=0.0, help="AdamW weight decay on 2-D weights (not norms, biases, tokens)."
    )
    betas: tuple[float, float] = internal((0.9, 0.95))  # AdamW
    fused_adamw: bool | None = internal(None)  # None: fused on CUDA, plain on CPU (trainers/run.py)
    grad_clip: float = opt(1.0, min=0.0, help="Max gradient norm (0: off).")
    seed: int = opt(0, help="Seed of the model init and the data order.")
    log_every: int = opt(20, min=1, help="Log a metrics line every N steps.")
    ckpt_every: int = opt(  # and always at the end of an invocation
        500, min=1, help="Checkpoint every N steps (RUN/checkpoints, overwritten)."
    )
    keep_every: int = opt(
        0, min=0, help="Also keep RUN/steps/NNNNNNN every N steps, never overwritten (0: off)."
    )
    stop_after: int | None = opt(
        None, min=1, help="End this invocation after N more steps, with a checkpoint."
    )
    resume: bool = opt(False, flags=("--resume",), help="Continue RUN/checkpoints exactly.")
    device: str = opt("auto", help=DEVICE_HELP)
    # a step's collectives wait for the slowest rank, and for rank 0 while it writes a checkpoint
    dist_timeout: int = opt(600, min=1, help=DIST_TIMEOUT_HELP)
    compile: bool = opt(False, flags=("--compile",), help="torch.compile the model.")
    # the autocast of the forward and backward passes; weights and optimiser state stay fp32
    precision: str = opt("auto", help=PRECISION_HELP)
    log_to: str = opt(
        "auto",
        help="Also log metrics and pictures to tensorboard (RUN/tensorboard), wandb (RUN/wandb; "
        "offline unless W&B is configured, never a login prompt) or none; auto: tensorboard when "
        "installed. Pictures are always saved in RUN/grids/ too.",
    )
    progress: bool = opt(True, help=PROGRESS_HELP)


GRID_DECODER_HELP = (
    "Pixel decoder for the training grids (RAE's model.pt or a train-decoder run); "
    "else PCA colours of the features."
)


def _counts(title: str, counts: dict[str, int], tail: str = ".") -> str:
    """A preset option's help: every preset with its parameter count."""
    return title + ", ".join(f"{n} ({c / 1e6:.1f}M)" for n, c in counts.items()) + tail


@flat_keywords
@dataclass(frozen=True)
class TrainVAEConfig:
    """Everything `train_vae` needs; saved as RUN/config.json."""

    features: str = opt(help="Train feature store (from extract-features)." + STORE_URL)
    out: str = opt(
        path=True,
        help="Run folder: config.json, log.txt, metrics.jsonl, checkpoints/, best/, pre-decay/.",
    )
    val_features: str | None = opt(
        None, help="Validation feature store; its loss selects best/." + STORE_URL
    )
    preset: str = opt(
        "flatdino-32x128",
        choices=VAE_PRESETS,
        help=_counts(
            "VAE preset, parameters at C=768: ",
            {n: vae_parameters(c)["total"] for n, c in VAE_PRESETS.items()},
        ),
    )
    tokens: int | None = opt(None, min=1, help="Override T, the number of latent tokens.")
    latent_dim: int | None = opt(None, min=1, help="Override d, the channels per token.")
    run: RunConfig = opt(
        factory=lambda: RunConfig(batch_size=512, lr=1e-4, weight_decay=0.02, betas=(0.9, 0.999)),
        helps={
            "steps": "Total optimiser steps (10% warmup, 10% decay unless set).",
            "epochs": "Total epochs; 50 -> 5/40/5 and 150 -> 5/123/22 warmup/stable/decay "
            "(paper Table 6).",
            "batch_size": "Global batch size (paper: 512).",
            "lr": "Peak learning rate (paper: 1e-4).",
        },
    )
    warmup_steps: int | None = opt(None, min=0, help="Warmup length in steps.")  # default 10%
    decay_steps: int | None = opt(None, min=0, help="Cosine decay length in steps.")  # 10%
    beta: float | None = opt(None, help="KL weight; default 1e-6 * 512 / (T * d) (paper Table 4).")
    recon: str = opt(
        "mse",
        choices=("mse", "huber"),
        help="Reconstruction loss: mse (paper) or huber (delta 1, the public code).",
    )
    num_workers: int = opt(2, min=0, help="Loader processes per rank.")
    shuffle_buffer: int = internal(1024)
    eval_every: int = opt(500, min=1, help="Validate every N steps.")  # + best/ with val_features
    resume_from: str | None = opt(
        None,
        path=True,
        help="Continue from this checkpoint, e.g. RUN/pre-decay with a longer --steps to extend "
        "a run.",
    )
    decoder: str | None = opt(None, path=True, help=GRID_DECODER_HELP)
    grid_images: int = opt(8, min=0, help="Fixed val images in that grid (0: no grid).")


@flat_keywords
@dataclass(frozen=True)
class TrainDiTConfig:
    """Everything `train_dit` needs; saved as RUN/config.json. Defaults are the paper's (§4.3)."""

    latents: str = opt(help="Latents store (from encode-latents)." + STORE_URL)
    out: str = opt(
        path=True,
        help="Run folder: config.json, log.txt, metrics.jsonl, checkpoints/ (model, EMA, latent "
        "stats, flow.json).",
    )
    preset: str = opt(  # T, d and the class count come from the store
        "dit-xl",
        choices=GENERATOR_PRESETS,
        help=_counts(
            "Generator preset (dit-dh-*: DiT-DH, a DiT with a wide decoupled head; the others "
            "LightningDiT), parameters on 32x128 latents: ",
            {n: generator_parameters(c) for n, c in GENERATOR_PRESETS.items()},
            ". T, d and the class count are read from --latents.",
        ),
    )
    run: RunConfig = opt(
        factory=lambda: RunConfig(batch_size=1024, log_every=100, ckpt_every=5000),
        helps={
            "steps": "Total optimiser steps.",
            "epochs": "Total epochs over the valid images (or --steps).",
            "batch_size": "Global batch size (paper: 1024).",
            "lr": "Constant learning rate (paper: 2e-4).",
        },
    )
    warmup_steps: int = opt(0, min=0, help="Linear warmup from 1e-6 over N steps (0: none).")
    ema_decay: float = opt(
        0.9995, min=0.0, max=1.0, help="EMA decay of the weights (kept in fp32)."
    )
    kappa: float = opt(3.0, min=1.0, help="Time shift t' = t/(k-(k-1)t); 1 is no shift.")
    time_dist: str = opt(
        "uniform", choices=("uniform", "logit-normal"), help="Distribution of t before the shift."
    )
    class_dropout: float = opt(
        0.1, min=0.0, max=1.0, help="Probability a label becomes the null class (CFG)."
    )
    normalize: bool = opt(
        False,
        flags=("--normalize",),
        help="Standardise latents per (token, dim) with the store's statistics.",
    )
    views: int | None = opt(
        None,
        min=1,
        help="Train on the first K stored views only (1: view 0, no flips); default: all stored "
        "views.",
    )
    cls: bool = opt(
        False,
        flags=("--cls",),
        help="Also generate each image's DINOv2 CLS token beside the latents (the official "
        "in_cls_dim; needs a latents store that kept it). `sample --save-features` writes it "
        "as cls.npy; the images do not use it.",
    )
    sample_every: int = opt(
        5000,
        min=0,
        help="Every N steps, with the EMA weights: a grid of 8 classes x 8 from fixed noise "
        "and FD-DINOv2 of --fd-samples samples against --fd-features, logged as fd_dinov2 "
        "(0: off). Needs the VAE the latents came from.",
    )
    fd_samples: int = opt(1000, min=2, help="Class-balanced samples (fixed noise) of that FD.")
    fd_features: str | None = opt(
        None,
        path=True,
        help="Reference feature store of that FD; default: the one the latents were encoded from.",
    )
    fd_reference: int = opt(
        10_000,
        min=2,
        help="At most this many reference rows (whole blocks spread evenly over the store).",
    )
    sample_steps: int = opt(50, min=1, help="Euler steps of those samples.")
    sample_cfg: float = opt(  # guided while 0 < t < 1, not over `sample`'s --cfg-interval
        1.0,
        min=1.0,
        help="Their guidance weight (1: none, one pass per step), applied at every step but t = 0.",
    )
    best_by_fd: bool = opt(
        False,
        flags=("--best-by-fd",),
        help="Keep RUN/best/ (a full checkpoint) at the lowest FD so far.",
    )
    decoder: str | None = opt(None, path=True, help=GRID_DECODER_HELP)


@flat_keywords
@dataclass(frozen=True)
class TrainDecoderConfig:
    """Everything `train_decoder` needs; saved as RUN/config.json."""

    features: str = opt(
        path=True, help="Feature store; the images are read back through its manifest."
    )
    out: str = opt(path=True, help="Run folder: config.json, log.txt, metrics.jsonl, checkpoints/.")
    preset: str = opt(
        "rae-vitxl",
        choices=PIXEL_DECODER_PRESETS,
        help=_counts(
            "Pixel decoder preset (RAE's ViT decoders; rae-vitxl is the published one): ",
            {n: pixel_decoder_parameters(c) for n, c in PIXEL_DECODER_PRESETS.items()},
        ),
    )
    run: RunConfig = opt(
        factory=RunConfig,
        helps={"steps": "Total optimiser steps (10% warmup, 10% cosine decay)."},
    )
    warmup_steps: int | None = opt(None, min=0, help="Warmup from 1e-6, in steps (default 10%).")
    decay_steps: int | None = opt(None, min=0, help="Cosine decay to 1e-8, in steps (default 10%).")
    noise_tau: float = opt(  # 0: off
        0.8, min=0.0, help="Feature noise sigma ~ U(0, tau) per sample (RAE: 0.8)."
    )
    l1_weight: float = opt(1.0, min=0.0, help="Weight of the L1 pixel loss.")
    mse_weight: float = opt(1.0, min=0.0, help="Weight of the MSE pixel loss.")
    perceptual_weight: float = internal(0.0)  # extension point: LPIPS (needs weights; refused > 0)
    adversarial_weight: float = internal(0.0)  # extension point: GAN (needs weights; refused > 0)
    num_workers: int = opt(2, min=0, help="Feature loader processes per rank.")
    image_threads: int = opt(4, min=1, help="Threads decoding target images.")
    grid_every: int = opt(
        500,
        min=0,
        help="Every N steps, reconstructions of fixed images beside their targets (0: off).",
    )
    grid_images: int = opt(8, min=0, help="Images in that grid.")
