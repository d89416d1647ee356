"""The `flatdino` console script. Commands parse options into a config and call one function."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Annotated

import typer

from ..pipeline.configs import EncodeConfig, ExtractConfig, ImportConfig
from ..pipeline.errors import FlatDinoError
from .demo import demo_cmd
from .evals import bench_app, eval_app
from .generate import config_command
from .options import fail, setup_logging
from .sample import sample_cmd
from .sweep import sweep_cmd
from .train import run_info, train_decoder_cmd, train_dit_cmd, train_vae_cmd

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
    if presets:
        _presets_info(as_json)
        return
    if path is None:
        fail("info needs a store or run folder (or --presets)")
    from ..pipeline.feature_store import FeatureStore
    from ..pipeline.latent_store import LatentStore
    from ..pipeline.storage import is_url
    from ..pipeline.store import store_kind

    run = None if is_url(path) else Path(path)
    if run and (run / "config.json").exists() and not (run / "zarr.json").exists():
        run_info(run, as_json)
        if plot:
            from ..trainers.tracking import plot_curves

            try:
                typer.echo(f"wrote {plot_curves(run)}")
            except FlatDinoError as e:
                fail(str(e))
        return
    if plot:
        fail(f"--plot draws a run's curves; {path!r} is not a run folder")
    try:
        latents = store_kind(path) == LatentStore.KIND
        summary = (LatentStore if latents else FeatureStore)(path).summary()
    except FlatDinoError as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    attrs = summary.pop("attrs")
    for name, a in summary.pop("arrays").items():
        shards = f" shards={tuple(a['shards'])}" if "shards" in a else ""
        typer.echo(
            f"{name:10s} {a['dtype']:8s} shape={tuple(a['shape'])} chunks={tuple(a['chunks'])}"
            f"{shards}"
        )
    for key, value in summary.items():
        typer.echo(f"{key}: {value}")
    fp = attrs.get("fingerprint", {})
    if latents:
        typer.echo(f"vae: {attrs.get('vae_checkpoint')} sha256={str(fp.get('vae_sha256'))[:16]}…")
        typer.echo(f"features: {attrs.get('features_store')}")
    else:
        typer.echo(
            f"backbone: {fp.get('backbone')} weights_sha256={str(fp.get('weights_sha256'))[:16]}…"
        )
        typer.echo(f"input: {json.dumps(fp.get('input'))}")
        typer.echo(f"preprocessing: {json.dumps(fp.get('preprocessing'))}")
    typer.echo(f"created: {attrs.get('created')} flatdino {attrs.get('package_version')}")


def _presets_info(as_json: bool) -> None:
    from ..models.dit import DIT_PRESETS, count_dit_parameters
    from ..models.official import OFFICIAL_PARAMETERS
    from ..models.vae import VAE_PRESETS, count_parameters

    rows = [
        {
            "preset": n,
            "model": "vae",
            "parameters": count_parameters(c)["total"],
            "official": OFFICIAL_PARAMETERS.get(n),
        }
        for n, c in VAE_PRESETS.items()
    ]
    rows += [
        {
            "preset": n,
            "model": "dit",
            "parameters": count_dit_parameters(c),
            "official": OFFICIAL_PARAMETERS.get(n),
        }
        for n, c in DIT_PRESETS.items()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'preset':<16} {'model':<5} {'parameters':>13} {'official code':>14}")
    for r in rows:
        official = f"{r['official']:,}" if r["official"] else "-"
        typer.echo(f"{r['preset']:<16} {r['model']:<5} {r['parameters']:>13,} {official:>14}")


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
