"""The `flatdino sample` command: a trained DiT -> images (or latents and features)."""

from __future__ import annotations

import typer

from ..sampling.configs import SampleConfig
from .generate import Text, config_command


def _interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as e:
        raise typer.BadParameter(f"expected two numbers like 0.225,1.0; got {text!r}") from e
    if not 0.0 <= lo <= hi <= 1.0:
        raise typer.BadParameter(f"expected 0 <= low <= high <= 1; got {text!r}")
    return lo, hi


def _sample(ctx: typer.Context, values: dict) -> None:
    """Generate latents with a trained DiT and decode them to DINOv2 features and images.

    The sampler's state stays fp32 whatever --precision the networks run in.
    Under `torchrun --nproc-per-node G flatdino sample ...` the batches are shared across the G
    ranks and the outputs are identical to a one-process run. An interrupted run continues from
    the batches already written when the same command is run again."""
    from ..sampling.sample import sample

    s = sample(SampleConfig(**values))
    typer.echo(
        f"{s['out']}: {s['samples']} samples in {s['seconds']:.1f}s; wrote {', '.join(s['written'])}"
    )
    if not s["images"]:
        typer.echo(
            "no --decoder: wrote latents and features only; pass --decoder with RAE's "
            "decoders/dinov2/wReg_base/ViTXL_n08/model.pt or a `flatdino train-decoder` run to get images"
        )


sample_cmd = config_command(
    SampleConfig,
    _sample,
    text={"cfg_interval": Text(lambda v: ",".join(map(str, v)), _interval)},
    doc=_sample.__doc__,
)
