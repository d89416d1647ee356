"""The `flatdino demo` command: the whole pipeline on the built-in digits, with a report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..pipeline.errors import FlatDinoError
from .options import Backend, BackendOpt, DeviceOpt, ProgressOpt, fail


def demo_cmd(
    out: Annotated[
        Path,
        typer.Option(help="Folder for the stores, runs, samples/ and report.md / report.json."),
    ] = Path("demo-out"),
    fresh: Annotated[
        bool,
        typer.Option(
            "--fresh",
            help="Delete OUT (only a demo's own folder) and start over; default: reuse finished stages.",
        ),
    ] = False,
    vae_steps: Annotated[
        int, typer.Option(min=1, help="train-vae optimiser steps (batch 32).")
    ] = 600,
    dit_steps: Annotated[
        int, typer.Option(min=1, help="train-dit optimiser steps (batch 64).")
    ] = 2000,
    decoder_steps: Annotated[
        int, typer.Option(min=1, help="train-decoder optimiser steps (batch 32).")
    ] = 300,
    per_class: Annotated[
        int, typer.Option(min=1, help="Digits generated per class (the judge scores all of them).")
    ] = 32,
    sample_steps: Annotated[int, typer.Option(min=1, help="Euler steps of the sampler.")] = 50,
    cfg: Annotated[
        float, typer.Option(min=1.0, help="Classifier-free guidance weight (1: none).")
    ] = 4.5,
    backend: BackendOpt = Backend.local,
    device: DeviceOpt = "auto",
    progress: ProgressOpt = True,
) -> None:
    """Run every stage on the built-in digits (offline, CPU, minutes) and write a report.

    extract-features (train, val) -> train-vae -> encode-latents (train, val) -> train-decoder ->
    train-dit -> sample -> guidance sweep and samplers -> evaluations. Re-running reuses the
    finished stages and resumes an interrupted one; changing a step count needs --fresh.
    Stage times: docs/benchmarks.md.
    """
    from .demo_run import DemoConfig, run_demo

    config = DemoConfig(
        out=str(out),
        fresh=fresh,
        vae_steps=vae_steps,
        dit_steps=dit_steps,
        decoder_steps=decoder_steps,
        per_class=per_class,
        sample_steps=sample_steps,
        cfg=cfg,
        backend=backend.value,
        device=device,
        progress=progress,
    )
    try:
        r = run_demo(config, echo=typer.echo)
    except FlatDinoError as e:
        fail(str(e))
    g = r["generated"]
    typer.echo(
        f"demo done in {r['total_seconds']:.0f}s: VAE val rel. error {r['vae_val_rel_err']:.3f}, "
        f"generated digits recognised {g['accuracy']:.1%} ({g['n']} samples)"
    )
    typer.echo(f"see {out / 'report.md'} and {out / 'samples' / 'grid.png'}")
