"""The `flatdino sample` command: a trained DiT -> images (or latents and features)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..models.flow import CFG_INTERVAL
from ..pipeline.errors import FlatDinoError
from .options import DeviceOpt, PrecisionOpt, ProgressOpt, fail

INTERVAL = f"{CFG_INTERVAL[0]},{CFG_INTERVAL[1]}"  # "0.225,1.0"


def _interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as e:
        raise typer.BadParameter(f"expected two numbers like {INTERVAL}; got {text!r}") from e
    if not 0.0 <= lo <= hi <= 1.0:
        raise typer.BadParameter(f"expected 0 <= low <= high <= 1; got {text!r}")
    return lo, hi


def sample_cmd(
    dit: Annotated[
        Path, typer.Option(help="train-dit run folder (uses checkpoints/) or a checkpoint folder.")
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Output folder: grid.png, images/, samples.npz, sample.json (+ latents.npy, features.npy)."
        ),
    ],
    classes: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated class indices (e.g. 207,360) or 'all'; default: all classes, cycled to --n."
        ),
    ] = None,
    per_class: Annotated[int, typer.Option(min=1, help="Samples per class.")] = 1,
    n: Annotated[
        int | None,
        typer.Option(
            "--n",
            "--num-samples",
            min=1,
            help="Total samples (under torchrun spell it --num-samples: torchrun takes --n for "
            "its own options), cycling through the classes, so class-balanced: --n 50000 gives 50 "
            "per ImageNet class (the ADM/RAE FID protocol); overrides --per-class.",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the noise; a seed gives the same images at any batch size.")
    ] = 0,
    steps: Annotated[
        int, typer.Option(min=1, help="Sampler steps on the model's time-shifted grid.")
    ] = 50,
    sampler: Annotated[
        str,
        typer.Option(
            metavar="euler|heun",
            help="euler or heun. Heun is second order, 2 network evaluations per step except the "
            "last, so --steps 25 with heun costs about as much as 50 Euler steps.",
        ),
    ] = "euler",
    cfg: Annotated[
        float,
        typer.Option(
            min=1.0,
            help="Guidance weight w: v_u + w (v_c - v_u), with --guide-dit v_weak + w (v_main - "
            "v_weak); 1 runs one pass (no guidance).",
        ),
    ] = 4.5,
    cfg_interval: Annotated[
        str, typer.Option(help="Apply guidance only while t (0 noise, 1 data) is in LOW,HIGH.")
    ] = INTERVAL,
    guide_dit: Annotated[
        Path | None,
        typer.Option(
            help="AutoGuidance: guide with a weaker model, e.g. a smaller DiT or an earlier "
            "checkpoint of this run (RUN/steps/NNNNNNN), instead of the unconditional branch, "
            "with the same --cfg weight and --cfg-interval."
        ),
    ] = None,
    ema: Annotated[
        bool,
        typer.Option(help="Use the EMA weights (--no-ema: the raw ones), also of --guide-dit."),
    ] = True,
    decoder: Annotated[
        Path | None,
        typer.Option(
            help="Pixel decoder: RAE's model.pt (ViTXL_n08) or a train-decoder run folder. Without it: latents and features only."
        ),
    ] = None,
    vae: Annotated[
        Path | None,
        typer.Option(
            help="VAE checkpoint; default: the one the DiT's latents were encoded with (checked by sha256)."
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            min=1,
            help="Samples per batch (per rank under torchrun). A resumed run must keep it: the "
            "batches are part of the result's identity.",
        ),
    ] = 64,
    save_features: Annotated[
        bool, typer.Option("--save-features", help="Also write latents.npy and features.npy.")
    ] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    writers: Annotated[
        int, typer.Option(min=1, help="Threads encoding PNGs and writing batches beside the GPU.")
    ] = 8,
    progress: ProgressOpt = True,
) -> None:
    """Generate latents with a trained DiT and decode them to DINOv2 features and images.

    The sampler's state stays fp32 whatever --precision the networks run in.
    Under `torchrun --nproc-per-node G flatdino sample ...` the batches are shared across the G
    ranks and the outputs are identical to a one-process run. An interrupted run continues from
    the batches already written when the same command is run again."""
    from ..sampling.sample import SampleConfig, sample

    try:
        config = SampleConfig(
            dit=str(dit),
            out=str(out),
            classes=classes,
            per_class=per_class,
            n=n,
            seed=seed,
            steps=steps,
            sampler=sampler,
            cfg=cfg,
            cfg_interval=_interval(cfg_interval),
            ema=ema,
            guide_dit=str(guide_dit) if guide_dit else None,
            decoder=str(decoder) if decoder else None,
            vae=str(vae) if vae else None,
            batch_size=batch_size,
            save_features=save_features,
            device=device,
            precision=precision,
            writers=writers,
            progress=progress,
        )
        s = sample(config)
    except FlatDinoError as e:
        fail(str(e))
    typer.echo(
        f"{s['out']}: {s['samples']} samples in {s['seconds']:.1f}s; wrote {', '.join(s['written'])}"
    )
    if not s["images"]:
        typer.echo(
            "no --decoder: wrote latents and features only; pass --decoder with RAE's "
            "decoders/dinov2/wReg_base/ViTXL_n08/model.pt or a `flatdino train-decoder` run to get images"
        )
