"""The `flatdino` console script. Commands parse options into a config and call one function."""

from __future__ import annotations

import errno
import json
from typing import Annotated

import typer

from ..pipeline.configs import EncodeConfig, ExtractConfig, ImportConfig
from .demo import demo_cmd
from .evals import bench_app, eval_app
from .generate import config_command
from .info import show_info
from .options import APP_SETTINGS, setup_logging
from .sample import sample_cmd
from .sweep import sweep_cmd
from .train import train_decoder_cmd, train_dit_cmd, train_vae_cmd

app = typer.Typer(
    name="flatdino",
    help="FlatDINO: diffusion on 32 one-dimensional tokens of DINOv2 features.\n\n"
    "Data flow: extract-features -> train-vae -> encode-latents -> train-dit -> sample.",
    pretty_exceptions_enable=False,
    add_completion=False,
    **APP_SETTINGS,
)


@app.callback()
def _configure_logging() -> None:
    """Log lines of every command to stdout (rank 0 only under torchrun): the one place logging is
    configured; library code only logs."""
    setup_logging()


def _extract(ctx: typer.Context, values: dict) -> None:
    """Images -> DINOv2 patch features (N, V, 256, C) float16 in a resumable Zarr store."""
    from ..pipeline.extract import extract_features

    s = extract_features(ExtractConfig(**values))
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


app.command("extract-features")(config_command(ExtractConfig, _extract, doc=_extract.__doc__))


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


def _encode(ctx: typer.Context, values: dict) -> None:
    """Feature store -> FlatDINO latents (N, V, T, d) with per-(token, dim) statistics, resumable."""
    from ..pipeline.encode import encode_latents

    s = encode_latents(EncodeConfig(**values))
    if s["shards_run"] == 0:
        typer.echo(f"{s['store']}: complete already ({s['images']} images); nothing to do")
    else:
        typer.echo(
            f"{s['store']}: encoded {s['images_run']} images in {s['shards_run']} shards, "
            f"{s['seconds']:.1f}s"
        )


def _import(ctx: typer.Context, values: dict) -> None:
    """Official JAX checkpoint (VAE or generator) -> a flatdino checkpoint folder. Needs the
    extra: pip install 'flatdino[official]'."""
    from ..pipeline.official import import_official

    s = import_official(ImportConfig(**values))
    params = s["parameters"]
    total = params["total"] if isinstance(params, dict) else params
    typer.echo(
        f"{values['out']}: the official {s['kind']} ({s['preset']}, {total / 1e6:.2f}M "
        f"parameters) from {s['checkpoint']}"
    )


app.command("encode-latents")(config_command(EncodeConfig, _encode, doc=_encode.__doc__))
app.command("import-official")(config_command(ImportConfig, _import, doc=_import.__doc__))


app.command(
    "train-vae",
    help="Train the FlatDINO VAE on a cached feature store (run under torchrun for DDP).",
)(train_vae_cmd)
app.command(
    "train-dit",
    help="Train a generator (LightningDiT or DiT-DH) on a cached latents store (run under "
    "torchrun for DDP).",
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
