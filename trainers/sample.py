"""`flatdino sample`: a trained DiT -> latents -> DINOv2 features -> pixels, saved as images.

Everything the model needs is read from its checkpoint: the architecture (config.json), κ, the
latent normalisation and the VAE the latents came from (flow.json, latent_stats.safetensors). The
noise of all N samples is drawn at once from one seeded generator, so a seed gives the same images
whatever the batch size. Outputs in --out:
    grid.png          every sample, one row per class (labelled) when classes are given
    images/NNNNN_cK.png   one PNG per sample
    samples.npz       arr_0: uint8 (N, H, W, 3) and labels (N,): the ADM / OpenAI FID evaluator's layout
    latents.npy, features.npy   (N, T, d) float32 and (N, P, C) float16, with --save-features or
                      without a pixel decoder
    sample.json       the config and the identities of the checkpoints used
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from tqdm import tqdm

from flatdino.pipeline.checkpoints import load_pixel_decoder, resolve_checkpoint
from flatdino.pipeline.errors import FlatDinoError
from flatdino.pipeline.extract import resolve_device
from flatdino.pipeline.latents import load_vae, resolve_vae

from .dit import DiTConfig, LightningDiT
from .flow import LatentNorm, euler_sample


@dataclass(frozen=True)
class SampleConfig:
    """Everything `sample` needs; the CLI only fills it in."""

    dit: str  # train-dit run folder or checkpoint folder
    out: str  # output folder
    classes: str | None = None  # "207,360" or "all"; None: all classes, cycled to --n
    per_class: int = 1  # samples per class (with --classes)
    n: int | None = None  # total samples (classes cycled); default: classes x per_class
    seed: int = 0
    steps: int = 50  # Euler steps
    cfg: float = 4.5  # guidance weight w; 1 disables guidance (one pass per step)
    cfg_interval: tuple[float, float] = (0.225, 1.0)  # guidance only for t in this interval
    ema: bool = True  # the EMA weights (False: the raw ones)
    decoder: str | None = None  # train-decoder run/checkpoint folder or RAE's model.pt
    vae: str | None = None  # override the VAE checkpoint recorded by the latents store
    batch_size: int = 64
    save_features: bool = False  # also write latents.npy and features.npy
    device: str = "auto"
    progress: bool = True


def load_dit(path: str, ema: bool = True) -> tuple[LightningDiT, dict, LatentNorm, Path]:
    """The DiT (EMA or raw weights), its flow.json, its latent normalisation, and its folder."""
    ckpt = resolve_checkpoint(path, "--dit", "train-dit")
    if not (ckpt / "flow.json").exists():
        raise FlatDinoError(f"--dit {path!r} is not a train-dit checkpoint (no flow.json)")
    model = LightningDiT(DiTConfig(**json.loads((ckpt / "config.json").read_text())))
    weights = ckpt / ("ema.safetensors" if ema else "model.safetensors")
    model.load_state_dict(load_file(str(weights)), strict=True)
    stats = load_file(str(ckpt / "latent_stats.safetensors"))
    norm = LatentNorm(stats["mean"], stats["std"])
    flow = json.loads((ckpt / "flow.json").read_text())
    return model.eval().requires_grad_(False), flow, norm, ckpt


def class_labels(cfg: SampleConfig, num_classes: int) -> np.ndarray:
    """The class of every sample: --classes x --per-class, grouped by class, or cycled to --n."""
    if cfg.classes in (None, "all"):
        chosen = list(range(num_classes))
    else:
        try:
            chosen = [int(c) for c in cfg.classes.split(",") if c.strip()]
        except ValueError as e:
            raise FlatDinoError(
                f"--classes must be 'all' or integers like 207,360; got {cfg.classes!r}"
            ) from e
        bad = [c for c in chosen if not 0 <= c < num_classes]
        if bad or not chosen:
            raise FlatDinoError(
                f"--classes {cfg.classes!r}: the model knows classes 0..{num_classes - 1}"
            )
    if cfg.n is not None:
        return np.resize(np.asarray(chosen, np.int64), cfg.n)  # cycled: class-balanced
    return np.repeat(np.asarray(chosen, np.int64), cfg.per_class)


def _load_vae(cfg: SampleConfig, flow: dict):
    """The VAE the latents were encoded with (checked by checksum), or the one --vae names."""
    path = cfg.vae or flow.get("vae_checkpoint")
    if not path:
        raise FlatDinoError("the DiT checkpoint names no VAE; pass --vae RUN_DIR")
    try:
        model, sha = load_vae(resolve_vae(path))
    except FlatDinoError as e:
        raise FlatDinoError(f"{e} (the VAE the DiT's latents came from; pass --vae)") from e
    expected = (flow.get("latents_fingerprint") or {}).get("vae_sha256")
    if expected and sha != expected:
        raise FlatDinoError(
            f"VAE {path!r} (sha256 {sha[:12]}) is not the one the DiT's latents were encoded with "
            f"({expected[:12]}); pass --vae with that checkpoint"
        )
    return model


@torch.no_grad()
def generate(
    cfg: SampleConfig, dit, norm, vae, decoder, labels: np.ndarray, kappa: float, device
) -> dict:
    """Latents (N, T, d), features (N, P, C) and, with a decoder, uint8 images (N, H, W, 3)."""
    T, d = dit.cfg.tokens, dit.cfg.latent_dim
    noise = torch.randn(len(labels), T, d, generator=torch.Generator().manual_seed(cfg.seed))
    out: dict[str, list] = {"latents": [], "features": [], "images": []}
    for i in tqdm(range(0, len(labels), cfg.batch_size), desc="sample", unit="batch",
                  disable=not cfg.progress):  # fmt: skip
        x0 = noise[i : i + cfg.batch_size].to(device)
        y = torch.from_numpy(labels[i : i + cfg.batch_size]).to(device)
        x1 = euler_sample(dit, x0, y, cfg.steps, kappa, cfg.cfg, cfg.cfg_interval, dit.null_class)
        z = norm.denormalize(x1)  # (B, T, d) in the VAE's latent space
        feats = vae.decode(z)  # (B, P, C)
        out["latents"].append(z.float().cpu())
        out["features"].append(feats.half().cpu())
        if decoder is not None:
            img = decoder(feats.float()).clamp(0, 1)  # (B, 3, H, W)
            out["images"].append((img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items() if v}


def make_grid(
    images: np.ndarray, labels: np.ndarray, names: list[str] | None, by_class: bool
) -> Image.Image:
    """One row per class (labelled on the left) when `by_class`, else a near-square grid."""
    n, h, w, _ = images.shape
    if by_class:
        rows = [np.flatnonzero(labels == c) for c in dict.fromkeys(labels.tolist())]
    else:
        cols = int(np.ceil(np.sqrt(n)))
        rows = [np.arange(i, min(i + cols, n)) for i in range(0, n, cols)]
    margin = 64 if by_class else 0
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (margin + cols * w, len(rows) * h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, idx in enumerate(rows):
        if by_class:
            c = int(labels[idx[0]])
            draw.text((4, r * h + h // 2 - 6), names[c] if names else str(c), fill=(0, 0, 0))
        for k, i in enumerate(idx):
            grid.paste(Image.fromarray(images[i]), (margin + k * w, r * h))
    return grid


def _save_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def write_outputs(
    cfg: SampleConfig, result: dict, labels: np.ndarray, names: list[str] | None
) -> list[str]:
    """Write the files of the module docstring; returns their names."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "images" in result:
        images = result["images"]
        tmp = out / ".images.tmp"  # written aside, then swapped in: no stale PNGs of an older run
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for i, (img, c) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(img).save(tmp / f"{i:05d}_c{c}.png")
        shutil.rmtree(out / "images", ignore_errors=True)
        os.replace(tmp, out / "images")
        _save_atomic(out / "samples.npz", lambda p: np.savez(p, arr_0=images, labels=labels))
        grid = make_grid(images, labels, names, by_class=cfg.classes is not None)
        _save_atomic(out / "grid.png", grid.save)
        written += ["grid.png", f"images/ ({len(images)} PNGs)", "samples.npz"]
    if cfg.save_features or "images" not in result:
        _save_atomic(out / "latents.npy", lambda p: np.save(p, result["latents"]))
        _save_atomic(out / "features.npy", lambda p: np.save(p, result["features"]))
        written += ["latents.npy", "features.npy"]
    return written


def sample(cfg: SampleConfig) -> dict:
    """Generate as `cfg` says and write the outputs; returns a summary."""
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise FlatDinoError("--steps and --batch-size must be at least 1")
    device = resolve_device(cfg.device)
    dit, flow, norm, ckpt = load_dit(cfg.dit, cfg.ema)
    labels = class_labels(cfg, dit.cfg.num_classes)
    vae = _load_vae(cfg, flow)
    decoder = load_pixel_decoder(cfg.decoder)[0] if cfg.decoder else None
    if decoder is not None and (decoder.cfg.num_patches, decoder.cfg.in_dim) != (
        vae.cfg.num_patches,
        vae.cfg.in_dim,
    ):
        raise FlatDinoError(
            f"--decoder expects ({decoder.cfg.num_patches}, {decoder.cfg.in_dim}) features but the VAE "
            f"produces ({vae.cfg.num_patches}, {vae.cfg.in_dim}); use a decoder for this backbone"
        )
    for m in (dit, norm, vae, decoder):
        if m is not None:
            m.to(device)
    tic = time.perf_counter()
    result = generate(cfg, dit, norm, vae, decoder, labels, float(flow["kappa"]), device)
    seconds = time.perf_counter() - tic
    written = write_outputs(cfg, result, labels, flow.get("class_names"))
    record = {"config": asdict(cfg), "dit_checkpoint": str(ckpt.resolve()), "flow": flow,
              "samples": len(labels), "seconds": seconds}  # fmt: skip
    _save_atomic(Path(cfg.out) / "sample.json",
                 lambda p: p.write_text(json.dumps(record, indent=2, default=str)))  # fmt: skip
    return {"out": cfg.out, "samples": len(labels), "seconds": seconds, "written": written,
            "images": "images" in result}  # fmt: skip
