"""`flatdino sample`: a trained DiT -> latents -> DINOv2 features -> pixels, saved as images.

Everything the model needs is read from its checkpoint: the architecture (config.json), κ, the
latent normalisation and the VAE the latents came from (flow.json, latent_stats.safetensors). The
noise of all N samples is drawn at once from one seeded generator, so a seed gives the same images
whatever the batch size. Outputs in --out:
    grid.png          up to 32 classes x 16 samples, one labelled row per class when classes are
                      given (else the first 64 samples)
    images/NNNNN_cK.png   one PNG per sample
    samples.npz       arr_0: uint8 (N, H, W, 3) and labels (N,): the ADM / OpenAI FID evaluator's layout
    latents.npy, features.npy   (N, T, d) float32 and (N, P, C) float16, with --save-features or
                      without a pixel decoder
Everything is built in a folder beside --out, appended batch by batch (memory stays flat for a
50K-sample FID run), and swapped in at the end: no half-written or stale outputs. The disk's free
space is checked first; a failed or interrupted run deletes that folder.
    sample.json       the config and the identities of the checkpoints used
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from flatdino.models.flow import euler_sample
from flatdino.pipeline.checkpoints import load_dit, load_pixel_decoder, load_vae, resolve_vae
from flatdino.pipeline.env import resolve_device
from flatdino.pipeline.errors import FlatDinoError


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
    except (TypeError, KeyError, RuntimeError) as e:  # another model's checkpoint
        raise FlatDinoError(f"--vae {path!r} is not a FlatDINO VAE checkpoint: {e}") from e
    expected = (flow.get("latents_fingerprint") or {}).get("vae_sha256")
    if expected and sha != expected:
        raise FlatDinoError(
            f"VAE {path!r} (sha256 {sha[:12]}) is not the one the DiT's latents were encoded with "
            f"({expected[:12]}); pass --vae with that checkpoint"
        )
    return model


class NpyWriter:
    """An .npy file written front to back into `file`, batch by batch, its header stating the
    final shape. Plain sequential writes, not a memory map: a full disk raises OSError (ENOSPC)
    where a written memory map would kill the process with SIGBUS."""

    def __init__(self, file: BinaryIO, dtype: np.dtype, shape: tuple[int, ...]):
        self.file = file
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                  "shape": tuple(shape)}  # fmt: skip
        np.lib.format.write_array_header_2_0(file, header)

    def write(self, rows: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(rows).tobytes())


def bytes_needed(n: int, dit, vae, decoder, keep_features: bool) -> int:
    """At most how many bytes a run of `n` samples writes beside --out."""
    per_sample = 0
    if keep_features:  # latents.npy float32, features.npy float16
        per_sample += (
            dit.cfg.tokens * dit.cfg.latent_dim * 4 + vae.cfg.num_patches * vae.cfg.in_dim * 2
        )
    if decoder is not None:  # samples.npz, and PNGs at most the raw size
        per_sample += 2 * decoder.cfg.image_size**2 * decoder.cfg.channels
    return n * per_sample


def check_free_space(folder: Path, needed: int, out: str) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise FlatDinoError(
            f"sampling needs up to {needed / 2**30:.2f} GiB beside --out {out!r} but only "
            f"{free / 2**30:.2f} GiB is free there; free some space, sample fewer (--n / "
            "--per-class), or choose an --out on a larger disk"
        )


@torch.no_grad()
def generate(cfg: SampleConfig, dit, norm, vae, decoder, labels: np.ndarray, kappa: float, device,
             tmp: Path, shown: frozenset[int] = frozenset()) -> dict[int, np.ndarray]:  # fmt: skip
    """Generate batch by batch into `tmp`, so memory stays flat: PNGs and samples.npz (images
    (N, H, W, 3) uint8 + labels) with a decoder; latents.npy (N, T, d) float32 and features.npy
    (N, P, C) float16 with --save-features or without one. Returns the images numbered in `shown`
    (the ones grid.png shows)."""
    T, d = dit.cfg.tokens, dit.cfg.latent_dim
    noise = torch.randn(len(labels), T, d, generator=torch.Generator().manual_seed(cfg.seed))
    keep_features = cfg.save_features or decoder is None
    kept: dict[int, np.ndarray] = {}
    with ExitStack() as files:
        writers: dict[str, NpyWriter] = {}

        def write(name: str, value: np.ndarray) -> None:  # each file opened at the first batch
            if name not in writers:
                if name == "images":  # samples.npz: an uncompressed zip of .npy files
                    npz = files.enter_context(zipfile.ZipFile(tmp / "samples.npz", "w"))
                    with npz.open("labels.npy", "w") as f:
                        np.lib.format.write_array(f, labels)
                    file = files.enter_context(npz.open("arr_0.npy", "w", force_zip64=True))
                else:
                    file = files.enter_context(open(tmp / f"{name}.npy", "wb"))
                writers[name] = NpyWriter(file, value.dtype, (len(labels), *value.shape[1:]))
            writers[name].write(value)

        for i in tqdm(range(0, len(labels), cfg.batch_size), desc="sample", unit="batch",
                      disable=not cfg.progress):  # fmt: skip
            x0 = noise[i : i + cfg.batch_size].to(device)
            y = torch.from_numpy(labels[i : i + cfg.batch_size]).to(device)
            x1 = euler_sample(dit, x0, y, cfg.steps, kappa, cfg.cfg, cfg.cfg_interval,
                              dit.null_class)  # fmt: skip
            z = norm.denormalize(x1)  # (B, T, d) in the VAE's latent space
            feats = vae.decode(z)  # (B, P, C)
            if keep_features:
                write("latents", z.float().cpu().numpy())
                write("features", feats.half().cpu().numpy())
            if decoder is not None:
                img = decoder(feats.float()).clamp(0, 1)  # (B, 3, H, W)
                pixels = (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                write("images", pixels)
                for k, image in enumerate(pixels, start=i):
                    Image.fromarray(image).save(tmp / "images" / f"{k:05d}_c{labels[k]}.png")
                    if k in shown:
                        kept[k] = image
    return kept


def grid_indices(labels: np.ndarray, by_class: bool, per_row: int = 16, rows: int = 32) -> list:
    """The samples grid.png shows: the first `rows` classes with up to `per_row` samples each, or
    the first 64 samples in near-square rows; a 50K-sample run still gets a small grid."""
    if by_class:
        classes = list(dict.fromkeys(labels.tolist()))[:rows]
        return [np.flatnonzero(labels == c)[:per_row] for c in classes]
    n = min(len(labels), 64)
    cols = int(np.ceil(np.sqrt(n)))
    return [np.arange(i, min(i + cols, n)) for i in range(0, n, cols)]


def make_grid(images, labels: np.ndarray, rows: list, names: list[str] | None,
              by_class: bool) -> Image.Image:  # fmt: skip
    """The chosen samples in rows (`images[i]`: sample i, H x W x 3); each class row labelled on
    the left when `by_class`."""
    h, w = np.asarray(images[rows[0][0]]).shape[:2]
    margin = 64 if by_class else 0
    grid = Image.new("RGB", (margin + max(len(r) for r in rows) * w, len(rows) * h), "white")
    draw = ImageDraw.Draw(grid)
    for r, idx in enumerate(rows):
        if by_class:
            c = int(labels[idx[0]])
            draw.text((4, r * h + h // 2 - 6), names[c] if names else str(c), fill=(0, 0, 0))
        for k, i in enumerate(idx):
            grid.paste(Image.fromarray(np.asarray(images[i])), (margin + k * w, r * h))
    return grid


def _open_out(out: Path) -> Path:
    """A fresh folder beside --out to build the outputs in (swapped in by `_swap_in`)."""
    if out.exists() and not out.is_dir():
        raise FlatDinoError(f"--out {str(out)!r} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "sample.json").exists():
        raise FlatDinoError(
            f"--out {str(out)!r} holds files that are not a sample run; choose another --out"
        )
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    (tmp / "images").mkdir(parents=True)
    return tmp


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace --out (a previous sample run, if any) by the finished folder: no stale files."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _check_pair(decoder, vae, flow: dict, cfg: SampleConfig) -> None:
    if decoder is not None and (decoder.cfg.num_patches, decoder.cfg.in_dim) != (
        vae.cfg.num_patches, vae.cfg.in_dim):  # fmt: skip
        raise FlatDinoError(
            f"--decoder expects ({decoder.cfg.num_patches}, {decoder.cfg.in_dim}) features but the "
            f"VAE produces ({vae.cfg.num_patches}, {vae.cfg.in_dim}); use a decoder for this backbone"
        )
    if cfg.cfg != 1.0 and not flow.get("class_dropout"):
        raise FlatDinoError(
            "the DiT was trained without class dropout, so its null class never learned; "
            "sample with --cfg 1"
        )


def sample(cfg: SampleConfig) -> dict:
    """Generate as `cfg` says and write the outputs; returns a summary."""
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise FlatDinoError("--steps and --batch-size must be at least 1")
    device = resolve_device(cfg.device)
    dit, flow, norm, ckpt = load_dit(cfg.dit, cfg.ema)
    labels = class_labels(cfg, dit.cfg.num_classes)
    vae = _load_vae(cfg, flow)
    decoder = load_pixel_decoder(cfg.decoder)[0] if cfg.decoder else None
    _check_pair(decoder, vae, flow, cfg)
    for m in (dit, norm, vae, decoder):
        if m is not None:
            m.to(device)
    out = Path(cfg.out)
    keep_features = cfg.save_features or decoder is None
    tmp = _open_out(out)
    try:  # a failed or interrupted run leaves nothing behind to fill the disk
        check_free_space(tmp, bytes_needed(len(labels), dit, vae, decoder, keep_features), cfg.out)
        tic = time.perf_counter()
        by_class = cfg.classes is not None
        rows = grid_indices(labels, by_class)
        shown = frozenset(int(i) for row in rows for i in row)
        kappa = float(flow["kappa"])
        images = generate(cfg, dit, norm, vae, decoder, labels, kappa, device, tmp, shown)
        seconds = time.perf_counter() - tic
        written = ["latents.npy", "features.npy"] if keep_features else []
        if decoder is None:
            (tmp / "images").rmdir()
        else:
            grid = make_grid(images, labels, rows, flow.get("class_names"), by_class)
            grid.save(tmp / "grid.png")
            written = ["grid.png", f"images/ ({len(labels)} PNGs)", "samples.npz", *written]
        record = {"config": asdict(cfg), "dit_checkpoint": str(ckpt.resolve()), "flow": flow,
                  "samples": len(labels), "seconds": seconds}  # fmt: skip
        (tmp / "sample.json").write_text(json.dumps(record, indent=2, default=str))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, out)
    return {"out": cfg.out, "samples": len(labels), "seconds": seconds, "written": written,
            "images": decoder is not None}  # fmt: skip
