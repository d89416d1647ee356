"""The `flatdino eval …` commands: measurements on stores and runs, as JSON and a short table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..pipeline.errors import FlatDinoError
from .options import APP_SETTINGS, DeviceOpt, ProgressOpt, fail

eval_app = typer.Typer(
    help="Evaluation and analysis: each command prints a table and can write a JSON result.",
    **APP_SETTINGS,
)


@eval_app.command("knn")
def knn_cmd(
    train: Annotated[
        list[Path],
        typer.Option(help="Train store (features or latents); repeat to evaluate several pairs."),
    ],
    val: Annotated[
        list[Path], typer.Option(help="Validation store, paired in order with --train.")
    ],
    k: Annotated[int, typer.Option(min=1, help="Neighbours that vote (DINO: 20).")] = 20,
    temperature: Annotated[
        float, typer.Option(min=1e-6, help="Votes weigh exp(similarity / T) (DINO: 0.07).")
    ] = 0.07,
    out: Annotated[
        Path | None, typer.Option(help="Also write the results to this JSON file.")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda for the similarity search.")] = "cpu",
) -> None:
    """Weighted k-NN top-1/top-5 on mean-pooled, L2-normalised view-0 vectors of each store pair."""
    from ..eval.knn import knn_eval

    if len(train) != len(val):
        fail(f"give one --val per --train; got {len(train)} --train and {len(val)} --val")
    try:
        results = knn_eval(
            [(str(a), str(b)) for a, b in zip(train, val, strict=True)], k, temperature, device
        )
    except FlatDinoError as e:
        fail(str(e))
    for r in results:
        typer.echo(
            f"{r['kind']:18s} dim {r['dim']:5d}  top-1 {100 * r['top1']:6.2f}%  "
            f"top-5 {100 * r['top5']:6.2f}%  ({r['n_train']} train, {r['n_val']} val)  {r['train']}"
        )
    if out:
        out.write_text(json.dumps(results, indent=2))


@eval_app.command("redundancy")
def redundancy_cmd(
    features: Annotated[
        Path, typer.Option(help="Feature store (its images are re-read for the pixel side).")
    ],
    out: Annotated[Path, typer.Option(help="Folder for redundancy.json and redundancy.png.")],
    images: Annotated[int, typer.Option(min=1, help="Valid images used (the first N).")] = 256,
    fraction: Annotated[
        float, typer.Option(min=0.01, max=1.0, help="Variance fraction the PCA must explain.")
    ] = 0.95,
) -> None:
    """PCA dims of DINOv2 patch features vs raw pixel patches, and similarity vs patch distance."""
    from ..eval.redundancy import plot_redundancy, redundancy

    try:
        result = redundancy(str(features), images, fraction)
    except FlatDinoError as e:
        fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    (out / "redundancy.json").write_text(json.dumps(result, indent=2))
    plot_redundancy(result, str(out / "redundancy.png"))
    typer.echo(
        f"PCA components for {fraction:.0%} of the variance ({result['images']} images): "
        f"DINOv2 patches {result['feature_pca_dims']}/{result['feature_dims']}, "
        f"pixel patches {result['pixel_pca_dims']}/{result['pixel_dims']}"
    )
    near = dict(zip(result["distance"], result["cosine_similarity"], strict=True))
    typer.echo(
        "mean cosine similarity by patch distance: "
        + ", ".join(f"{d}: {near[d]:.3f}" for d in list(near)[:6])
    )
    typer.echo(f"wrote {out / 'redundancy.json'} and {out / 'redundancy.png'}")


@eval_app.command("ablate")
def ablate_cmd(
    features: Annotated[Path, typer.Option(help="Feature store (view 0 of its valid images).")],
    vae: Annotated[Path, typer.Option(help="train-vae run folder or checkpoint folder.")],
    out: Annotated[
        Path, typer.Option(help="Folder for ablation.npy, ablation.json, ablation.png.")
    ],
    images: Annotated[int, typer.Option(min=1, help="Valid images used (the first N).")] = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 32,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Zero one latent token at a time: the L2 change of every reconstructed patch, per token."""
    import numpy as np

    from ..eval.ablate import ablate, plot_ablation

    try:
        heat = ablate(str(features), str(vae), images, batch_size, device)
    except FlatDinoError as e:
        fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "ablation.npy", heat)  # (T, P)
    peaks = [int(i) for i in heat.argmax(1)]
    summary = {
        "features": str(features),
        "vae": str(vae),
        "images": images,
        "shape": list(heat.shape),
        "peak_patch": peaks,
        "mean_change": heat.mean(1).tolist(),
    }
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    plot_ablation(heat, str(out / "ablation.png"))
    typer.echo(
        f"{heat.shape[0]} tokens x {heat.shape[1]} patches; mean change per token "
        f"{heat.mean():.4f} (min {heat.mean(1).min():.4f}, max {heat.mean(1).max():.4f}); "
        f"wrote {out / 'ablation.png'}"
    )


@eval_app.command("noise")
def noise_cmd(
    features: Annotated[Path, typer.Option(help="Feature store (view 0 of its valid images).")],
    vae: Annotated[Path, typer.Option(help="train-vae run folder or checkpoint folder.")],
    out: Annotated[Path, typer.Option(help="Folder for noise.json and noise.png.")],
    decoder: Annotated[
        Path | None,
        typer.Option(help="Pixel decoder (RAE model.pt or train-decoder run): adds PSNR."),
    ] = None,
    images: Annotated[int, typer.Option(min=1, help="Valid images used (the first N).")] = 64,
    steps: Annotated[int, typer.Option(min=2, help="Noise levels on [0, 1].")] = 11,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
) -> None:
    """Gaussian noise on the latents vs on the DINOv2 features: feature error (and PSNR) vs sigma."""
    from ..eval.noise import noise_eval, plot_noise

    try:
        result = noise_eval(
            str(features), str(vae), str(decoder) if decoder else None, images, steps, device
        )
    except FlatDinoError as e:
        fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    (out / "noise.json").write_text(json.dumps(result, indent=2))
    plot_noise(result, str(out / "noise.png"))
    typer.echo(f"  {'sigma':>5s}  {'latents':>8s}  {'features':>8s}   relative feature error")
    for s, a, b in zip(
        result["sigma"], result["latent_rel_err"], result["feature_rel_err"], strict=True
    ):
        typer.echo(f"  {s:5.2f}  {a:8.4f}  {b:8.4f}")
    typer.echo(f"wrote {out / 'noise.json'} and {out / 'noise.png'}")


bench_app = typer.Typer(help="Benchmarks that print ratios measured side by side.", **APP_SETTINGS)


@bench_app.command("throughput")
def throughput_cmd(
    out: Annotated[Path, typer.Option(help="Folder for throughput.csv and throughput.png.")],
    preset: Annotated[
        str, typer.Option(help="DiT preset (same model on both latent shapes).")
    ] = "dit-xl",
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,2,4,8,16",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="fp32, or bf16 autocast (GPUs).")] = "fp32",
    seconds: Annotated[
        float, typer.Option(min=0.0, help="Timing per point, after a warm-up.")
    ] = 2.0,
) -> None:
    """DiT forward passes per second against batch size, 32 vs 256 tokens (Figures 15-17)."""
    import csv

    from ..eval.throughput import plot_throughput, throughput
    from ..models.dit import DIT_PRESETS

    if preset not in DIT_PRESETS or dtype not in ("fp32", "bf16"):
        fail(f"--preset must be one of {sorted(DIT_PRESETS)} and --dtype fp32 or bf16")
    try:
        sizes = [int(b) for b in batches.split(",")]
    except ValueError:
        fail(f"--batches must be integers like 1,2,4; got {batches!r}")
    rows = throughput(preset, sizes, device, dtype, seconds)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "throughput.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_throughput(rows, str(out / "throughput.png"))
    by = {(r["latent"], r["batch"]): r["samples_per_s"] for r in rows}
    for b in sizes:
        flat, rae = by["FlatDINO", b], by["RAE", b]
        typer.echo(
            f"  batch {b:4d}: 32 tokens {flat:10.2f}/s  256 tokens {rae:10.2f}/s  ratio {flat / rae:5.2f}x"
        )
    typer.echo(f"wrote {out / 'throughput.csv'} and {out / 'throughput.png'}")


@eval_app.command("fid")
def fid_cmd(
    real: Annotated[
        Path,
        typer.Option(
            help="Reference set: image folder (recursive, e.g. ImageNet's train/ or val/), Parquet "
            "manifest, samples.npz, feature store, features.npy or a stats .npz of --save-stats."
        ),
    ],
    fake: Annotated[
        Path | None,
        typer.Option(
            help="Set to compare (e.g. the samples.npz of `flatdino sample`), same kinds; "
            "without it, only --real's statistics are computed and saved (--save-stats)."
        ),
    ] = None,
    space: Annotated[
        str,
        typer.Option(
            help="inception (standard FID) or dinov2 (FD-DINOv2, the pipeline's backbone)."
        ),
    ] = "inception",
    backbone: Annotated[
        str, typer.Option(help="Backbone for images in the dinov2 space (as extract-features).")
    ] = "dinov2-vitb14-reg",
    weights: Annotated[
        Path | None, typer.Option(help="Local backbone weights (as extract-features --weights).")
    ] = None,
    inception_weights: Annotated[
        Path | None,
        typer.Option(
            help="Local pt_inception-2015-12-05-6726825d.pth (default: the torch hub cache)."
        ),
    ] = None,
    device: DeviceOpt = "auto",
    batch_size: Annotated[
        int, typer.Option(min=1, help="Images per forward pass of the feature network.")
    ] = 64,
    workers: Annotated[int, typer.Option(min=1, help="Threads decoding and cropping images.")] = 8,
    max_failed_fraction: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Unreadable images are skipped and counted; more than this fraction of a set is an error.",
        ),
    ] = 0.01,
    save_stats: Annotated[
        Path | None,
        typer.Option(
            help="Write the reference set's mu, sigma and how they were computed to this .npz, to "
            "reuse as --real."
        ),
    ] = None,
    precision_recall: Annotated[
        bool,
        typer.Option(
            "--precision-recall",
            help="Also k-NN precision and recall (k=3; needs vectors, not stats).",
        ),
    ] = False,
    pr_samples: Annotated[
        int,
        typer.Option(
            min=4, help="Precision/recall use a seeded subset of at most this many per set."
        ),
    ] = 50_000,
    out: Annotated[
        Path | None, typer.Option(help="Also write the result to this JSON file.")
    ] = None,
    progress: ProgressOpt = True,
) -> None:
    """Fréchet distance (and precision/recall) between a reference set and another set.

    Memory stays bounded (images stream through in batches; the statistics accumulate in
    float64), so a 1.28M-image ImageNet folder works as --real; save its statistics once with
    --save-stats and pass the .npz afterwards."""
    from ..eval.fid import FidConfig, fid

    cfg = FidConfig(
        real=str(real),
        fake=str(fake) if fake else None,
        space=space,
        backbone=backbone,
        weights=str(weights) if weights else None,
        inception_weights=str(inception_weights) if inception_weights else None,
        device=device,
        batch_size=batch_size,
        workers=workers,
        max_failed_fraction=max_failed_fraction,
        precision_recall=precision_recall,
        pr_samples=pr_samples,
        save_stats=str(save_stats) if save_stats else None,
        progress=progress,
    )
    try:
        result = fid(cfg)
    except FlatDinoError as e:
        fail(str(e))
    shown = {k: v for k, v in result.items() if k != "identity"}
    typer.echo(
        "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
    )
    if out:
        out.write_text(json.dumps(result, indent=2))


@eval_app.command("rfid")
def rfid_cmd(
    features: Annotated[
        Path, typer.Option(help="Validation feature store (its images are re-read).")
    ],
    vae: Annotated[Path, typer.Option(help="train-vae run folder or checkpoint folder.")],
    decoder: Annotated[
        Path, typer.Option(help="Pixel decoder: RAE's model.pt or a train-decoder run.")
    ],
    space: Annotated[str, typer.Option(help="inception or dinov2 (see `eval fid`).")] = "inception",
    backbone: Annotated[
        str, typer.Option(help="Backbone of the dinov2 space.")
    ] = "dinov2-vitb14-reg",
    weights: Annotated[Path | None, typer.Option(help="Local backbone weights.")] = None,
    inception_weights: Annotated[
        Path | None, typer.Option(help="Local FID Inception weights file.")
    ] = None,
    images: Annotated[int, typer.Option(min=2, help="Valid images used (the first N).")] = 1000,
    device: Annotated[str, typer.Option(help="cpu or cuda for the VAE and the decoder.")] = "cpu",
    out: Annotated[
        Path | None, typer.Option(help="Also write the result to this JSON file.")
    ] = None,
) -> None:
    """rFID: images vs decoder(VAE(features)), and vs decoder(features) to isolate the VAE's cost."""
    from ..eval.rfid import RfidConfig, rfid

    cfg = RfidConfig(
        features=str(features),
        vae=str(vae),
        decoder=str(decoder),
        space=space,
        backbone=backbone,
        weights=str(weights) if weights else None,
        inception_weights=str(inception_weights) if inception_weights else None,
        images=images,
        device=device,
    )
    try:
        result = rfid(cfg)
    except FlatDinoError as e:
        fail(str(e))
    typer.echo(
        "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
    )
    if out:
        out.write_text(json.dumps(result, indent=2))
