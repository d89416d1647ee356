"""The `flatdino` console script. Commands parse options into a config and call one function."""

from __future__ import annotations

import errno
import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..models.dinov2 import BACKBONES
from ..pipeline.errors import FlatDinoError
from .demo import demo_cmd
from .evals import bench_app, eval_app
from .info import show_info
from .options import (
    Backend,
    BackendOpt,
    DeviceOpt,
    GpusOpt,
    PrecisionOpt,
    ProgressOpt,
    RayAddressOpt,
    WorkersOpt,
    fail,
    setup_logging,
)
from .sample import sample_cmd
from .sweep import sweep_cmd
from .train import train_decoder_cmd, train_dit_cmd, train_vae_cmd

app = typer.Typer(
    name="flatdino",
    help="FlatDINO: diffusion on 32 one-dimensional tokens of DINOv2 features.\n\n"
    "Data flow: extract-features -> train-vae -> encode-latents -> train-dit -> sample.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _configure_logging() -> None:
    """Log lines of every command to stdout (rank 0 only under torchrun): the one place logging is
    configured; library code only logs."""
    setup_logging()


Backbone = Enum("Backbone", {k: k for k in BACKBONES}, type=str)  # choices from the registry


class Split(str, Enum):
    all = "all"
    train = "train"
    val = "val"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


@app.command("extract-features")
def extract_features_cmd(
    data: Annotated[
        str,
        typer.Option(
            help="ImageFolder directory (ROOT/CLASS/IMAGE), Parquet manifest with 'path' and 'label' columns, or 'digits' (built-in, offline)."
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            help="Feature store to create or resume (Zarr v3). A local path or an s3:// / gs:// / az:// URL (`flatdino[cloud]`)."
        ),
    ],
    split: Annotated[
        Split,
        typer.Option(
            help="digits: train (80%), val (20%) or all rows of a fixed seeded split. Directories and manifests: recorded in the store only."
        ),
    ] = Split.all,
    backbone: Annotated[
        Backbone,
        typer.Option(
            help="dinov2-vitb14-reg: DINOv2-B/14 with 4 registers (timm). tiny: same structure, random weights, for tests and the demo."
        ),
    ] = Backbone("dinov2-vitb14-reg"),
    weights: Annotated[
        Path | None,
        typer.Option(
            help="Local weights: timm safetensors, original DINOv2 .pth, or a transformers checkpoint directory. Default: the Hugging Face hub."
        ),
    ] = None,
    views: Annotated[
        int,
        typer.Option(
            min=1,
            help="Views stored per image: 0 centre crop, 1 its flip, >=2 seeded random-resized crops.",
        ),
    ] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the random crops of views >= 2.")] = 0,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Backbone batch size (images x views).")
    ] = 64,
    shard_size: Annotated[
        int,
        typer.Option(min=8, help="Images per unit of work (resume granularity); a multiple of 8."),
    ] = 64,
    dtype: Annotated[
        Precision,
        typer.Option(
            help="Backbone compute precision; bf16 for GPUs (features are stored as float16 either way)."
        ),
    ] = Precision.fp32,
    device: DeviceOpt = "auto",
    backend: BackendOpt = Backend.ray,
    workers: WorkersOpt = 1,
    num_gpus_per_worker: GpusOpt = None,
    torch_threads: Annotated[
        int,
        typer.Option(
            min=0,
            help="CPU threads per backbone worker; 0: a Ray actor takes cores / workers, "
            "--backend local keeps the process's setting.",
        ),
    ] = 0,
    decode_tasks_per_cpu: Annotated[
        int,
        typer.Option(
            min=1,
            help="Ray backend: image-decoding tasks per CPU core the actors leave free (each "
            "asks for 1/N CPU); 2 or more when decoding waits on storage.",
        ),
    ] = 1,
    ray_address: RayAddressOpt = None,
    max_failed_fraction: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Exit 1 when more than this fraction of images fail to decode (they are kept as invalid rows).",
        ),
    ] = 0.01,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace an existing store made with other settings."),
    ] = False,
    progress: ProgressOpt = True,
) -> None:
    """Images -> DINOv2 patch features (N, V, 256, C) float16 in a resumable Zarr store."""
    from ..pipeline.extract import ExtractConfig, extract_features

    cfg = ExtractConfig(
        data=data,
        out=str(out),
        split=split.value,
        backbone=backbone.value,
        weights=str(weights) if weights else None,
        views=views,
        view_seed=seed,
        batch_size=batch_size,
        shard_size=shard_size,
        dtype=dtype.value,
        device=device,
        backend=backend.value,
        workers=workers,
        num_gpus_per_worker=num_gpus_per_worker,
        torch_threads=torch_threads,
        decode_per_cpu=decode_tasks_per_cpu,
        ray_address=ray_address,
        max_failed_fraction=max_failed_fraction,
        overwrite=overwrite,
        progress=progress,
    )
    try:
        s = extract_features(cfg)
    except FlatDinoError as e:
        fail(str(e))
    if s.shards_run == 0:
        typer.echo(
            f"{s.store}: complete already ({s.images} images, {s.failed} failed); nothing to do"
        )
    else:
        typer.echo(
            f"{s.store}: wrote {s.images_run} images in {s.shards_run}/{s.shards_total} shards, "
            f"{s.failed} failed, {s.seconds:.1f}s, {s.images_per_s:.1f} images/s "
            f"({s.steady_images_per_s:.1f} after start-up)"
        )
    for line in s.failures:
        typer.echo(f"  failed: {line}")


@app.command("info")
def info_cmd(
    path: Annotated[
        str | None,
        typer.Argument(
            help="A feature or latents store (a path or an s3:// / gs:// / az:// URL), or a "
            "train-vae / train-dit run folder."
        ),
    ] = None,
    presets: Annotated[
        bool,
        typer.Option(
            "--presets",
            help="List the model presets with their parameter counts beside the official "
            "models' (counted from the official code).",
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the full summary as JSON.")
    ] = False,
    plot: Annotated[
        bool,
        typer.Option(
            "--plot",
            help="A run: also write RUN/curves.png, every metric of metrics.jsonl against the "
            "step (loss, lr, grad-norm, validation, FD), for users of neither TensorBoard nor W&B.",
        ),
    ] = False,
) -> None:
    """A store: shape, dtype, attrs, valid and done counts, completeness. A run: model, progress."""
    show_info(path, presets, as_json, plot)


class LatentDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"


@app.command("encode-latents")
def encode_latents_cmd(
    features: Annotated[
        str,
        typer.Option(
            help="Feature store to encode (from extract-features). A local path or an s3:// / gs:// / az:// URL (`flatdino[cloud]`)."
        ),
    ],
    vae: Annotated[
        Path,
        typer.Option(
            help="train-vae run folder (uses best/, else checkpoints/) or a checkpoint folder."
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            help="Latents store to create or resume (Zarr v3). A local path or an s3:// / gs:// / az:// URL (`flatdino[cloud]`)."
        ),
    ],
    batch_size: Annotated[
        int, typer.Option(min=1, help="Encoder batch size (images x views).")
    ] = 256,
    dtype: Annotated[
        LatentDtype, typer.Option(help="Stored dtype of mu (and logvar).")
    ] = LatentDtype.float32,
    save_logvar: Annotated[bool, typer.Option("--save-logvar", help="Also store logvar.")] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    backend: BackendOpt = Backend.ray,
    workers: WorkersOpt = 1,
    num_gpus_per_worker: GpusOpt = None,
    ray_address: RayAddressOpt = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace an existing store made with another VAE or settings."
        ),
    ] = False,
    progress: ProgressOpt = True,
) -> None:
    """Feature store -> FlatDINO latents (N, V, T, d) with per-(token, dim) statistics, resumable."""
    from ..pipeline.encode import EncodeConfig, encode_latents

    cfg = EncodeConfig(
        features=str(features),
        vae=str(vae),
        out=str(out),
        batch_size=batch_size,
        dtype=dtype.value,
        save_logvar=save_logvar,
        device=device,
        precision=precision,
        backend=backend.value,
        workers=workers,
        num_gpus_per_worker=num_gpus_per_worker,
        ray_address=ray_address,
        overwrite=overwrite,
        progress=progress,
    )
    try:
        s = encode_latents(cfg)
    except FlatDinoError as e:
        fail(str(e))
    if s["shards_run"] == 0:
        typer.echo(f"{s['store']}: complete already ({s['images']} images); nothing to do")
    else:
        typer.echo(
            f"{s['store']}: encoded {s['images_run']} images in {s['shards_run']} shards, {s['seconds']:.1f}s"
        )


@app.command("import-official")
def import_official_cmd(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="An official FlatDINO orbax checkpoint folder (noctrog/flatdino): ROOT (its "
            "latest step), ROOT/STEP, or a folder of items. A VAE has the items encoder + "
            "decoder, a generator model and model_ema; the config item beside them gives the "
            "architecture (without it the shapes must match a preset)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Checkpoint folder to write (config.json + safetensors), for encode-latents "
            "--vae, sample --dit / --vae and the evaluations."
        ),
    ],
    step: Annotated[
        int | None, typer.Option(min=0, help="Step of ROOT to import (default: the latest).")
    ] = None,
    vae: Annotated[
        Path | None,
        typer.Option(
            help="Generator only: the VAE its latents came from (an imported or trained VAE "
            "folder), recorded so that `sample` needs no --vae."
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace an --out written by import-official before."),
    ] = False,
) -> None:
    """Official JAX checkpoint (VAE or generator) -> a flatdino checkpoint folder. Needs the
    extra: pip install 'flatdino[official]'."""
    from ..pipeline.official import ImportConfig, import_official

    cfg = ImportConfig(
        checkpoint=str(checkpoint),
        out=str(out),
        step=step,
        vae=str(vae) if vae else None,
        overwrite=overwrite,
    )
    try:
        s = import_official(cfg)
    except FlatDinoError as e:
        fail(str(e))
    params = s["parameters"]
    total = params["total"] if isinstance(params, dict) else params
    typer.echo(
        f"{out}: the official {s['kind']} ({s['preset']}, {total / 1e6:.2f}M parameters) "
        f"from {s['checkpoint']}"
    )


app.command(
    "train-vae",
    help="Train the FlatDINO VAE on a cached feature store (run under torchrun for DDP).",
)(train_vae_cmd)
app.command(
    "train-dit",
    help="Train the LightningDiT on a cached latents store (run under torchrun for DDP).",
)(train_dit_cmd)

app.command(
    "train-decoder",
    help="Train a pixel decoder from cached DINOv2 features to their images (RAE architecture).",
)(train_decoder_cmd)
app.command("sample")(sample_cmd)
app.command("sweep-cfg")(sweep_cmd)
app.add_typer(eval_app, name="eval")
app.command("demo")(demo_cmd)
app.add_typer(bench_app, name="bench")


@app.command("flops")
def flops_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print both tables as JSON.")] = False,
) -> None:
    """The paper's FLOP accounting (Appendix H, Tables 7-9) beside this project's modules, counted."""
    from dataclasses import asdict

    from ..eval.flops import paper_table, project_table

    paper, ours = paper_table(), project_table()
    if as_json:
        typer.echo(json.dumps({"paper": [asdict(r) for r in paper], "project": ours}, indent=2))
        return
    typer.echo("Paper, Appendix H formula: GFLOPs per sample, one multiply-add = one FLOP")
    typer.echo(
        f"  {'model':10s} {'latent':9s} {'S':>4s} {'forward':>8s} {'train':>8s} "
        f"{'encoding':>9s} {'total':>8s} {'reduction':>9s}"
    )
    for r in paper:
        red = f"{r.reduction:8.1f}x" if r.reduction else ""
        typer.echo(
            f"  {r.model:10s} {r.latent:9s} {r.seq:4d} {r.forward:8.1f} {r.train:8.1f} "
            f"{r.encoding:9.1f} {r.total:8.1f} {red:>9s}"
        )
    typer.echo("This project's modules, forward multiply-adds counted by torch.utils.flop_counter")
    for r in ours:
        seq = f"S={r['seq']}" if r["seq"] else ""
        typer.echo(
            f"  {r['module']:17s} {r['latent']:9s} {seq:6s} {r['params_M']:8.1f}M params "
            f"{r['forward_G']:8.1f} GFLOPs"
        )


def main() -> None:
    """The console script: the typer app, with a full disk reported in one line, not a traceback.

    Stores are written shard by shard and checkpoints and reports by rename, so the work finished
    before the disk filled up is kept."""
    try:
        app()
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        where = f" writing {e.filename}" if e.filename else ""
        typer.secho(
            f"error: no space left on the device{where}; free some space or write to a "
            "larger disk, then run again (stores continue from their finished shards, "
            "sample from its finished batches, trainers with --resume)",
            fg=typer.colors.RED,
            err=True,
        )
        raise SystemExit(1) from None


if __name__ == "__main__":  # `python -m flatdino.cli.main`, as the tests run it in a subprocess
    main()
