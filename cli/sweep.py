"""The `flatdino sweep-cfg` command: FD-DINOv2 (and FID) over guidance weights x interval starts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..models.flow import CFG_INTERVAL
from ..pipeline.errors import FlatDinoError
from .options import DeviceOpt, PrecisionOpt, ProgressOpt, fail


def _floats(text: str, option: str) -> tuple[float, ...]:
    """'1,2,4.5' -> (1.0, 2.0, 4.5); an empty text is the empty tuple (refused by the library)."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise FlatDinoError(
            f"{option} must be comma-separated numbers like 1,2,4.5; got {text!r}"
        ) from e


def sweep_cmd(
    dit: Annotated[
        Path, typer.Option(help="train-dit run folder (uses checkpoints/) or a checkpoint folder.")
    ],
    features: Annotated[
        Path,
        typer.Option(
            help="Reference feature store (e.g. the val split): FD-DINOv2 against its view-0 "
            "features, FID against the images it was extracted from."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output folder: sweep.csv, heatmap.png, sweep.json.")],
    scales: Annotated[
        str, typer.Option(help="Guidance weights w (>= 1; 1: no guidance), comma-separated.")
    ] = "1,2,3,4.5,6",
    interval_starts: Annotated[
        str,
        typer.Option(
            help="Where guidance starts: guided while t (0 noise, 1 data) is in start..1; "
            "comma-separated."
        ),
    ] = f"0,0.1,{CFG_INTERVAL[0]},0.35",
    n: Annotated[
        int,
        typer.Option(
            "--n", min=2, help="Samples per cell, cycling through the classes (balanced)."
        ),
    ] = 1000,
    seed: Annotated[
        int, typer.Option(help="Seed of the noise; every cell starts from the same.")
    ] = 0,
    steps: Annotated[int, typer.Option(min=1, help="Euler steps.")] = 50,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Samples per batch (cells match `sample` at the same value).")
    ] = 64,
    ema: Annotated[bool, typer.Option(help="Use the EMA weights (--no-ema: the raw ones).")] = True,
    vae: Annotated[
        Path | None,
        typer.Option(help="VAE checkpoint; default: the one recorded in the DiT's flow.json."),
    ] = None,
    decoder: Annotated[
        Path | None,
        typer.Option(
            help="Pixel decoder (RAE's model.pt or a train-decoder run): also FID on the pixels."
        ),
    ] = None,
    inception_weights: Annotated[
        Path | None,
        typer.Option(
            help="pt_inception-2015-12-05-6726825d.pth for FID; default: the torch hub cache."
        ),
    ] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a sweep of another config in --out.")
    ] = False,
    progress: ProgressOpt = True,
) -> None:
    """Sample every (w, interval start) cell from the same noise and measure FD-DINOv2 (and FID).

    Rerun the same command after an interruption: the cells already in sweep.csv are skipped."""
    from ..eval.sweep import SweepConfig, sweep_cfg

    try:
        config = SweepConfig(
            dit=str(dit),
            features=str(features),
            out=str(out),
            scales=_floats(scales, "--scales"),
            interval_starts=_floats(interval_starts, "--interval-starts"),
            n=n,
            seed=seed,
            steps=steps,
            batch_size=batch_size,
            ema=ema,
            vae=str(vae) if vae else None,
            decoder=str(decoder) if decoder else None,
            inception_weights=str(inception_weights) if inception_weights else None,
            device=device,
            precision=precision,
            overwrite=overwrite,
            progress=progress,
        )
        s = sweep_cfg(config)
    except FlatDinoError as e:
        fail(str(e))
    typer.echo(
        f"{s['out']}: {s['cells_run']} cells computed, {s['cells_skipped']} already in sweep.csv, "
        f"{s['seconds']:.1f}s; wrote {', '.join(s['written'])}"
    )
    b = s["best"]
    typer.echo(
        f"best: --cfg {b['cfg']:g} --cfg-interval {b['interval_start']:g},1 "
        f"({b['metric']} {b['value']:.6g})"
    )
