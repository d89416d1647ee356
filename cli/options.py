"""Option types and helpers shared by the commands: one help text per option, one error path."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..pipeline.errors import FlatDinoError


class Backend(str, Enum):
    ray = "ray"
    local = "local"


# Options shared by the Ray jobs (extract-features, encode-latents) and the trainers: one help text.
DeviceOpt = Annotated[
    str, typer.Option(help="auto (cuda when visible, else cpu), cpu, cuda or cuda:N.")
]
BackendOpt = Annotated[
    Backend,
    typer.Option(
        help="ray: CPU tasks read/decode shards, actors run the model; local: one process, no Ray."
    ),
]
WorkersOpt = Annotated[int, typer.Option(min=1, help="Model actors (Ray backend).")]
GpusOpt = Annotated[
    float | None,
    typer.Option(help="GPUs per actor; default 1 when the Ray cluster has GPUs, else 0."),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        help="Ray cluster address ('auto' inside `ray job submit`); default: start Ray locally."
    ),
]
ProgressOpt = Annotated[bool, typer.Option(help="Show the progress bar.")]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        help="Network precision: auto (bf16 autocast and TF32 matmuls on CUDA, fp32 on CPU), "
        "bf16, or fp32 (full precision, no TF32)."
    ),
]


def fail(message: str) -> None:
    """Print one red line to stderr and exit 1 (user errors never show a traceback)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def setup_logging() -> None:
    """flatdino's log lines (INFO) and every library's warnings to stdout, as bare messages; under
    torchrun, ranks other than 0 print warnings only."""
    main = os.environ.get("RANK", "0") == "0" or int(os.environ.get("WORLD_SIZE", "1")) <= 1
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout, force=True)
    logging.getLogger("flatdino").setLevel(logging.INFO if main else logging.WARNING)


def config_with_overrides(cls, config: Path | None, given: dict, ctx: typer.Context) -> object:
    """cls(**saved config, **options the user typed): a saved config.json with CLI overrides."""
    values = {
        k: (str(v) if isinstance(v, Path) else getattr(v, "value", v)) for k, v in given.items()
    }
    if config is None:
        return cls(**values)
    try:
        saved = json.loads(Path(config).read_text()).get("train", {})
    except (OSError, ValueError) as e:
        raise FlatDinoError(f"cannot read --config {str(config)!r}: {e}") from e
    typed = {
        k: v
        for k, v in values.items()
        if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"
    }
    fields = {f.name for f in dataclasses.fields(cls)}  # saved fields without an option kept too
    merged = {**values, **{k: v for k, v in saved.items() if k in fields}, **typed}
    if "betas" in saved:
        merged["betas"] = tuple(saved["betas"])
    return cls(**merged)


# Options shared by the trainers (train-vae, train-dit, train-decoder).
MicroBatchOpt = Annotated[
    int | None,
    typer.Option(
        min=1, help="Per-device batch; smaller than batch/world means gradient accumulation."
    ),
]
SeedOpt = Annotated[int, typer.Option(help="Seed of the model init and the data order.")]
LogEveryOpt = Annotated[int, typer.Option(min=1, help="Log a metrics line every N steps.")]
CkptEveryOpt = Annotated[
    int, typer.Option(min=1, help="Checkpoint every N steps (RUN/checkpoints, overwritten).")
]
KeepEveryOpt = Annotated[
    int,
    typer.Option(
        min=0, help="Also keep RUN/steps/NNNNNNN every N steps, never overwritten (0: off)."
    ),
]
WeightDecayOpt = Annotated[
    float,
    typer.Option(min=0.0, help="AdamW weight decay on 2-D weights (not norms, biases, tokens)."),
]
GradClipOpt = Annotated[float, typer.Option(min=0.0, help="Max gradient norm (0: off).")]
CompileOpt = Annotated[bool, typer.Option("--compile", help="torch.compile the model.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue RUN/checkpoints exactly.")]
StopAfterOpt = Annotated[
    int | None,
    typer.Option(min=1, help="End this invocation after N more steps, with a checkpoint."),
]
LogToOpt = Annotated[
    str,
    typer.Option(
        help="Also log metrics and pictures to tensorboard (RUN/tensorboard), wandb (RUN/wandb; "
        "offline unless W&B is configured, never a login prompt) or none; auto: tensorboard when "
        "installed. Pictures are always saved in RUN/grids/ too."
    ),
]
GridDecoderOpt = Annotated[
    Path | None,
    typer.Option(
        help="Pixel decoder for the training grids (RAE's model.pt or a train-decoder run); "
        "else PCA colours of the features."
    ),
]
ConfigOpt = Annotated[
    Path | None, typer.Option(help="A saved RUN/config.json; options given here override it.")
]
