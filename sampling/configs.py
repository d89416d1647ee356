"""The config of `flatdino sample`, each field an option with its default and help
(pipeline/options.py). No torch: the CLI builds its options from it; sample.py re-exports it."""

from __future__ import annotations

from dataclasses import dataclass

from ..models.configs import CFG_INTERVAL
from ..pipeline.options import DEVICE_HELP, DIST_TIMEOUT_HELP, PRECISION_HELP, PROGRESS_HELP
from ..pipeline.options import option as opt

CHECKPOINT_HELP = "train-dit run folder (uses checkpoints/) or a checkpoint folder."


@dataclass(frozen=True)
class SampleConfig:
    """Everything `sample` needs; the CLI only fills it in."""

    dit: str = opt(path=True, help=CHECKPOINT_HELP)
    out: str = opt(
        path=True,
        help="Output folder: grid.png, images/, samples.npz, sample.json (+ latents.npy, "
        "features.npy).",
    )
    classes: str | None = opt(  # "207,360" or "all"
        None,
        help="Comma-separated class indices (e.g. 207,360) or 'all'; default: all classes, "
        "cycled to --n.",
    )
    per_class: int = opt(1, min=1, help="Samples per class.")  # with --classes
    n: int | None = opt(  # default: classes x per_class
        None,
        flags=("--n", "--num-samples"),
        min=1,
        help="Total samples (under torchrun spell it --num-samples: torchrun takes --n for "
        "its own options), cycling through the classes, so class-balanced: --n 50000 gives 50 "
        "per ImageNet class (the ADM/RAE FID protocol); overrides --per-class.",
    )
    seed: int = opt(0, help="Seed of the noise; a seed gives the same images at any batch size.")
    steps: int = opt(50, min=1, help="Sampler steps on the model's time-shifted grid.")
    sampler: str = opt(
        "euler",
        metavar="euler|heun",
        help="euler or heun. Heun is second order, 2 network evaluations per step except the "
        "last, so --steps 25 with heun costs about as much as 50 Euler steps.",
    )
    cfg: float = opt(  # 1 disables guidance (one pass per step)
        4.5,
        min=1.0,
        help="Guidance weight w: v_u + w (v_c - v_u), with --guide-dit v_weak + w (v_main - "
        "v_weak); 1 runs one pass (no guidance).",
    )
    cfg_interval: tuple[float, float] = opt(
        CFG_INTERVAL, help="Apply guidance only while t (0 noise, 1 data) is in LOW,HIGH."
    )
    guide_dit: str | None = opt(  # None: CFG's unconditional branch
        None,
        path=True,
        help="AutoGuidance: guide with a weaker model, e.g. a smaller DiT or an earlier "
        "checkpoint of this run (RUN/steps/NNNNNNN), instead of the unconditional branch, "
        "with the same --cfg weight and --cfg-interval.",
    )
    ema: bool = opt(True, help="Use the EMA weights (--no-ema: the raw ones), also of --guide-dit.")
    decoder: str | None = opt(
        None,
        path=True,
        help="Pixel decoder: RAE's model.pt (ViTXL_n08) or a train-decoder run folder. Without "
        "it: latents and features only.",
    )
    vae: str | None = opt(
        None,
        path=True,
        help="VAE checkpoint; default: the one the DiT's latents were encoded with (checked by "
        "sha256).",
    )
    batch_size: int = opt(
        64,
        min=1,
        help="Samples per batch (per rank under torchrun). A resumed run must keep it: the "
        "batches are part of the result's identity.",
    )
    save_features: bool = opt(
        False,
        flags=("--save-features",),
        help="Also write latents.npy and features.npy (and cls.npy, the sampled CLS token of a "
        "train-dit --cls model).",
    )
    device: str = opt("auto", help=DEVICE_HELP)
    dist_timeout: int = opt(  # longer than the trainers': the other ranks wait while rank 0
        1800,  # alone clears old work folders and assembles --out (minutes at --n 50000)
        min=1,
        help=DIST_TIMEOUT_HELP,
    )
    precision: str = opt("auto", help=PRECISION_HELP)  # the sampler's state stays fp32
    writers: int = opt(8, min=1, help="Threads encoding PNGs and writing batches beside the GPU.")
    progress: bool = opt(True, help=PROGRESS_HELP)
