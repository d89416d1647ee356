"""`flatdino info`: what a store, a run folder or the model presets hold, as text or JSON."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..pipeline.errors import FlatDinoError
from .options import fail


def show_info(path: str | None, presets: bool, as_json: bool, plot: bool) -> None:
    """`flatdino info`: a store, a run folder, or the presets (the command only parses)."""
    if presets:
        _presets_info(as_json)
        return
    if path is None:
        fail("info needs a store or run folder (or --presets)")
    from ..pipeline.storage import is_url

    run = None if is_url(path) else Path(path)
    if run and not run.exists():
        fail(f"{path!r} does not exist; info reads a store, a run or checkpoint folder")
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
    store_info(path, as_json)


def store_info(path: str, as_json: bool) -> None:
    """A store: shape, dtype, attrs, valid and done counts, completeness."""
    from ..pipeline.feature_store import FeatureStore
    from ..pipeline.latent_store import LatentStore
    from ..pipeline.store import store_kind

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


def run_info(run: Path, as_json: bool) -> None:
    """Model config and parameter count, last metrics and checkpoints of a run folder."""
    from ..models.dit_dh import count_generator_parameters, generator_config
    from ..models.pixel_decoder import PixelDecoderConfig, count_pixel_decoder_parameters
    from ..models.vae import VAEConfig, count_parameters
    from ..pipeline.checkpoints import config_kind, describe_json, read_json

    fix = "pass a run folder (the --out of a train-* command) or one of its checkpoint folders"
    try:
        config = read_json(run / "config.json", fix, "a run's or checkpoint's config.json")
    except FlatDinoError as e:
        fail(str(e))
    model = config.get("model", config)  # a run folder, or a checkpoint folder (model config only)
    kind = config_kind(config)[0]
    if kind is None:
        fail(
            f"{str(run / 'config.json')!r} is {describe_json(config)}, not a run's config.json; {fix}"
        )
    count = {
        "dit": lambda: count_generator_parameters(generator_config(**model)),
        "decoder": lambda: count_pixel_decoder_parameters(PixelDecoderConfig(**model)),
        "vae": lambda: count_parameters(VAEConfig(**model)),
    }[kind]
    try:
        params = count()
    except (TypeError, ValueError) as e:  # a config of an older model layout: still readable
        params = f"unknown: the config is of an older {kind} layout ({e})"
    summary = {
        "path": str(run),
        "kind": kind,
        "model": model,
        "parameters": params,
        "checkpoints": sorted(p.name for p in run.iterdir() if (p / "model.safetensors").exists()),
    }
    if (run / "metrics.jsonl").exists():
        lines = (run / "metrics.jsonl").read_text().splitlines()
        summary["last_metrics"] = json.loads(lines[-1]) if lines else None
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        typer.echo(f"{key}: {value}")


def _presets_info(as_json: bool) -> None:
    from ..models.dit_dh import GENERATOR_PRESETS, count_generator_parameters
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
            "parameters": count_generator_parameters(c),
            "official": OFFICIAL_PARAMETERS.get(n),
        }
        for n, c in GENERATOR_PRESETS.items()
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'preset':<16} {'model':<5} {'parameters':>13} {'official code':>14}")
    for r in rows:
        official = f"{r['official']:,}" if r["official"] else "-"
        typer.echo(f"{r['preset']:<16} {r['model']:<5} {r['parameters']:>13,} {official:>14}")
