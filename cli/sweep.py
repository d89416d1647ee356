"""The `flatdino sweep-cfg` command: FD-DINOv2 (and FID) over guidance weights x interval starts."""

from __future__ import annotations

import typer

from ..eval.configs import SweepConfig
from ..pipeline.errors import FlatDinoError
from .generate import Text, config_command


def _floats(text: str, option: str) -> tuple[float, ...]:
    """'1,2,4.5' -> (1.0, 2.0, 4.5); an empty text is the empty tuple (refused by the library)."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise FlatDinoError(
            f"{option} must be comma-separated numbers like 1,2,4.5; got {text!r}"
        ) from e


def _sweep(ctx: typer.Context, values: dict) -> None:
    """Sample every (w, interval start) cell from the same noise and measure FD-DINOv2 (and FID).

    Rerun the same command after an interruption: the cells already in sweep.csv are skipped."""
    from ..eval.sweep import sweep_cfg

    s = sweep_cfg(SweepConfig(**values))
    typer.echo(
        f"{s['out']}: {s['cells_run']} cells computed, {s['cells_skipped']} already in sweep.csv, "
        f"{s['seconds']:.1f}s; wrote {', '.join(s['written'])}"
    )
    b = s["best"]
    typer.echo(
        f"best: --cfg {b['cfg']:g} --cfg-interval {b['interval_start']:g},1 "
        f"({b['metric']} {b['value']:.6g})"
    )


def _numbers(option: str) -> Text:
    """A tuple of floats as comma-separated text ("1,2,4.5")."""
    return Text(lambda v: ",".join(f"{x:g}" for x in v), lambda text: _floats(text, option))


sweep_cmd = config_command(
    SweepConfig,
    _sweep,
    text={"scales": _numbers("--scales"), "interval_starts": _numbers("--interval-starts")},
    doc=_sweep.__doc__,
)
