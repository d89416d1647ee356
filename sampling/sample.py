"""`flatdino sample`: a trained DiT -> latents -> DINOv2 features -> pixels, saved as images.

Everything the model needs is read from its checkpoint: the architecture (config.json), κ, the
latent normalisation and the VAE the latents came from (flow.json, latent_stats.safetensors).
Outputs in --out:
    grid.png          up to 32 classes x 16 samples, one labelled row per class when classes are
                      given (else the first 64 samples)
    images/NNNNN_cK.png   one PNG per sample
    samples.npz       arr_0: uint8 (N, H, W, 3) and labels (N,): the ADM / OpenAI FID evaluator's layout
    latents.npy, features.npy   (N, T, d) float32 and (N, P, C) float16, with --save-features or
                      without a pixel decoder
    sample.json       the config, the identities of the checkpoints used and the timings

Sample i's noise depends only on (seed, i), and the samples are generated in fixed batches of
--batch-size (batch b holds samples b·B .. b·B + B - 1). Under torchrun rank r generates the
batches b with b mod world = r, so every batch is computed exactly as in a one-process run and
the outputs are identical, bit for bit, for any number of ranks (all ranks must see --out's
folder: one node, or a shared file system). Each finished batch is written to a work folder beside
--out (its PNGs, encoded in a thread pool while the next batch runs, then one .npz of its arrays,
by rename), so an interrupted run, rerun with the same command, continues from the batches
already written. When all are done, rank 0 assembles samples.npz, latents.npy and features.npy
batch by batch (memory stays flat for a 50K-sample FID run) and swaps the folder in as --out: no
half-written or stale outputs. The disk's free space is checked first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zipfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.distributed as torch_dist
from PIL import Image, ImageDraw
from tqdm import tqdm

from flatdino.models.flow import euler_sample
from flatdino.pipeline.checkpoints import load_dit, load_pixel_decoder, load_vae, resolve_vae
from flatdino.pipeline.env import autocast, fast_matmul, inference_dtype
from flatdino.pipeline.errors import FlatDinoError
from flatdino.trainers.runner import Dist, setup_distributed, teardown_distributed

log = logging.getLogger(__name__)


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
    batch_size: int = 64  # samples per batch; part of the result's identity (see the docstring)
    save_features: bool = False  # also write latents.npy and features.npy
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast + TF32 on CUDA, fp32 on CPU; bf16; fp32 (full)
    writers: int = 8  # threads encoding PNGs and writing batches
    progress: bool = True


def sample_noise(seed: int, index: int, shape: tuple[int, ...]) -> np.ndarray:
    """The starting noise of sample `index`: float32 N(0, I) from its own stream, seeded by
    (seed, index) only, so it does not depend on the batch, the rank or the number of samples."""
    return np.random.default_rng([seed, index]).standard_normal(shape, dtype=np.float32)


def batches_of(n: int, batch_size: int) -> list[range]:
    """The fixed batches of a run: batch b holds samples b·B .. min(b·B + B, n) - 1."""
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


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


def bytes_needed(left: int, total: int, dit, vae, decoder, keep_features: bool) -> int:
    """At most how many bytes a run writes beside --out: the batch files and PNGs of the `left`
    samples still to generate, plus the assembled arrays of all `total`."""
    arrays = 0  # per sample, in a batch file and again in the assembled outputs
    if keep_features:  # latents float32, features float16
        arrays += dit.cfg.tokens * dit.cfg.latent_dim * 4 + vae.cfg.num_patches * vae.cfg.in_dim * 2
    pixels = decoder.cfg.image_size**2 * decoder.cfg.channels if decoder is not None else 0
    return left * (arrays + 2 * pixels) + total * (arrays + pixels)  # PNGs at most the raw size


def check_free_space(folder: Path, needed: int, out: str) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise FlatDinoError(
            f"sampling needs up to {needed / 2**30:.2f} GiB beside --out {out!r} but only "
            f"{free / 2**30:.2f} GiB is free there; free some space, sample fewer (--n / "
            "--per-class), or choose an --out on a larger disk"
        )


class BatchWriter:
    """Writes finished batches off the main thread: each batch's PNGs in parallel on `threads`
    threads, then its arrays as `batches/BBBBBB.npz` (by rename: the file exists only once the
    whole batch, PNGs included, is on disk). At most `ahead` batches wait, so memory stays flat;
    an error in a writer is raised in the main thread at the next batch."""

    def __init__(self, work: Path, threads: int, ahead: int = 2):
        self.work, self.ahead = work, ahead
        self.pngs = ThreadPoolExecutor(max(1, threads), thread_name_prefix="png")
        self.finish = ThreadPoolExecutor(1, thread_name_prefix="batch")
        self.pending: deque[Future] = deque()

    def submit(
        self, b: int, rows: range, labels: np.ndarray, arrays: dict[str, np.ndarray]
    ) -> None:
        while len(self.pending) >= self.ahead:
            self.pending.popleft().result()
        pngs = []
        if "pixels" in arrays:
            for k, image in zip(rows, arrays["pixels"], strict=True):
                path = self.work / "images" / f"{k:05d}_c{labels[k]}.png"
                pngs.append(self.pngs.submit(save_png, image, path))
        self.pending.append(self.finish.submit(self._finish, b, pngs, arrays))

    def _finish(self, b: int, pngs: list[Future], arrays: dict[str, np.ndarray]) -> None:
        for f in pngs:
            f.result()
        final = batch_file(self.work, b)
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, final)

    def close(self) -> None:
        """Wait for every batch (raising a writer's error) and stop the threads."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pngs.shutdown(cancel_futures=True)
            self.finish.shutdown(cancel_futures=True)


def save_png(image: np.ndarray, path: Path) -> None:
    """zlib level 1: about 3x faster than PIL's default 6 on natural images, files ~7% larger
    (the FID evaluators read samples.npz; the PNGs are for people and other tools)."""
    Image.fromarray(image).save(path, compress_level=1)


def batch_file(work: Path, b: int) -> Path:
    return work / "batches" / f"{b:06d}.npz"


@torch.no_grad()
def generate(cfg: SampleConfig, dit, norm, vae, decoder, labels: np.ndarray, kappa: float,
             device: torch.device, work: Path, todo: list[int], dtype: torch.dtype | None = None,
             show_progress: bool = True) -> float:  # fmt: skip
    """Generate the batches `todo` (numbers into `batches_of`) into `work`: per batch its PNGs
    (with a decoder) and batches/BBBBBB.npz holding `pixels` uint8 (B, H, W, 3) with a decoder,
    `latents` float32 (B, T, d) and `features` float16 (B, P, C) with --save-features or without
    one. The networks run under autocast `dtype` (None: fp32). Returns the seconds spent in the
    networks (the rest is the writers' and the host's share)."""
    shape = (dit.cfg.tokens, dit.cfg.latent_dim)
    keep_features = cfg.save_features or decoder is None
    batches = batches_of(len(labels), cfg.batch_size)
    writer = BatchWriter(work, cfg.writers)
    network = 0.0
    try:
        for b in tqdm(
            todo, desc="sample", unit="batch", disable=not (cfg.progress and show_progress)
        ):
            rows = batches[b]
            x0 = torch.from_numpy(np.stack([sample_noise(cfg.seed, i, shape) for i in rows]))
            y = torch.from_numpy(labels[rows.start : rows.stop])
            tic = time.perf_counter()
            x1 = euler_sample(dit, x0.to(device), y.to(device), cfg.steps, kappa, cfg.cfg,
                              cfg.cfg_interval, dit.null_class, autocast=dtype)  # fmt: skip
            z = norm.denormalize(x1)  # (B, T, d) in the VAE's latent space
            with autocast(dtype, device):
                feats = vae.decode(z).float()  # (B, P, C)
                img = decoder(feats).float().clamp(0, 1) if decoder is not None else None
            arrays = {}
            if keep_features:
                arrays["latents"] = z.float().cpu().numpy()
                arrays["features"] = feats.half().cpu().numpy()
            if img is not None:  # (B, 3, H, W) -> (B, H, W, 3) uint8
                arrays["pixels"] = (
                    (img * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                )
            network += time.perf_counter() - tic  # the copies to the host wait for the device
            writer.submit(b, rows, labels, arrays)
    finally:
        writer.close()
    return network


def assemble(work: Path, labels: np.ndarray, batch_size: int, shown: frozenset[int]) -> dict:
    """Rank 0, once every batch is written: samples.npz (arr_0 + labels), latents.npy and
    features.npy in `work`, appended batch by batch in sample order. Returns the images numbered
    in `shown` (the ones grid.png shows)."""
    kept: dict[int, np.ndarray] = {}
    names = {"pixels": "samples.npz", "latents": "latents.npy", "features": "features.npy"}
    with ExitStack() as files:
        writers: dict[str, NpyWriter] = {}
        for b, rows in enumerate(batches_of(len(labels), batch_size)):
            with np.load(batch_file(work, b)) as batch:
                for name in batch.files:
                    value = batch[name]
                    if name not in writers:
                        writers[name] = _open_array(files, work / names[name], name, value, labels)
                    writers[name].write(value)
                    if name == "pixels":
                        kept.update((k, value[j]) for j, k in enumerate(rows) if k in shown)
    return kept


def _open_array(files: ExitStack, path: Path, name: str, first: np.ndarray,
                labels: np.ndarray) -> NpyWriter:  # fmt: skip
    """An NpyWriter for all N rows of `name`: into a plain .npy, or, for pixels, into arr_0.npy of
    samples.npz (an uncompressed zip, the layout the ADM evaluator reads) beside labels.npy."""
    if name == "pixels":
        npz = files.enter_context(zipfile.ZipFile(path, "w"))
        with npz.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, labels)
        file = files.enter_context(npz.open("arr_0.npy", "w", force_zip64=True))
    else:
        file = files.enter_context(open(path, "wb"))  # noqa: SIM115  # closed by the ExitStack
    return NpyWriter(file, first.dtype, (len(labels), *first.shape[1:]))


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


def _check_out(out: Path) -> None:
    """--out is a folder that is empty, absent or a previous sample run (never the user's files)."""
    if out.exists() and not out.is_dir():
        raise FlatDinoError(f"--out {str(out)!r} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "sample.json").exists():
        raise FlatDinoError(
            f"--out {str(out)!r} holds files that are not a sample run; choose another --out"
        )


def run_key(cfg: SampleConfig, ckpt: Path, device: torch.device) -> str:
    """What decides the outputs' bits: the config (not --out, the progress bar, the writer
    threads or the number of ranks), the device type and the checkpoint files' identities (name,
    size, mtime: a checkpoint saved again into the same folder is another run)."""
    fields = asdict(cfg)
    for name in ("out", "progress", "writers", "device"):
        fields.pop(name)
    files = sorted(p for p in ckpt.iterdir() if p.is_file()) if ckpt.is_dir() else [ckpt]
    ident = [str(ckpt.resolve())] + [
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files
    ]
    text = json.dumps([fields, device.type, ident], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _open_work(out: Path, key: str) -> Path:
    """The work folder of this config beside --out, kept from an interrupted run or made new; the
    work folders of other configs (and the temporary folders of older versions) are removed."""
    work = out.parent / f".{out.name}.partial-{key}"
    for stale in [
        *out.parent.glob(f".{out.name}.partial-*"),
        *out.parent.glob(f".{out.name}.tmp-*"),
    ]:
        if stale != work:
            log.info("removing %s: an unfinished sample run with another config", stale)
            shutil.rmtree(stale, ignore_errors=True)
    (work / "images").mkdir(parents=True, exist_ok=True)
    (work / "batches").mkdir(exist_ok=True)
    for tmp in (work / "batches").glob("*.tmp"):  # a batch a killed run was writing
        tmp.unlink()
    return work


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


def _barrier(d: Dist) -> None:
    if d.world > 1:
        torch_dist.barrier()


def sample(cfg: SampleConfig) -> dict:
    """Generate as `cfg` says and write the outputs (under torchrun: this rank's share, then rank 0
    assembles them); returns a summary."""
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.writers < 1:
        raise FlatDinoError("--steps, --batch-size and --writers must be at least 1")
    d = setup_distributed(cfg.device)
    try:
        with fast_matmul(d.device, cfg.precision):
            return _sample(cfg, d)
    finally:
        teardown_distributed(d)


def _sample(cfg: SampleConfig, d: Dist) -> dict:
    device, dtype = d.device, inference_dtype(cfg.precision, d.device)
    dit, flow, norm, ckpt = load_dit(cfg.dit, cfg.ema)
    labels = class_labels(cfg, dit.cfg.num_classes)
    vae = _load_vae(cfg, flow)
    decoder = load_pixel_decoder(cfg.decoder)[0] if cfg.decoder else None
    _check_pair(decoder, vae, flow, cfg)
    for m in (dit, norm, vae, decoder):
        if m is not None:
            m.to(device)
    out = Path(cfg.out)
    _check_out(out)
    keep_features = cfg.save_features or decoder is None
    batches = batches_of(len(labels), cfg.batch_size)
    key = run_key(cfg, Path(ckpt), device)
    work = out.parent / f".{out.name}.partial-{key}"
    done = {b for b in range(len(batches)) if batch_file(work, b).exists()}
    if d.main:  # checked before anything is written; the batch files and the assembled copy
        left = sum(len(batches[b]) for b in range(len(batches)) if b not in done)
        needed = bytes_needed(left, len(labels), dit, vae, decoder, keep_features)
        existing = next(p for p in (out.parent, *out.parent.parents) if p.exists())
        check_free_space(existing, needed, cfg.out)
        work = _open_work(out, key)
        if done:
            log.info("resuming %s: %d of %d batches already written", work, len(done), len(batches))
    _barrier(d)
    todo = [b for b in range(d.rank, len(batches), d.world) if b not in done]
    tic = time.perf_counter()
    network = generate(cfg, dit, norm, vae, decoder, labels, float(flow["kappa"]), device, work,
                       todo, dtype, show_progress=d.main)  # fmt: skip
    generated = time.perf_counter() - tic
    _barrier(d)  # every rank's batches are on disk
    written = ["latents.npy", "features.npy"] if keep_features else []
    if d.main:
        by_class = cfg.classes is not None
        rows = grid_indices(labels, by_class)
        shown = frozenset(int(i) for row in rows for i in row)
        images = assemble(work, labels, cfg.batch_size, shown)
        if decoder is None:
            (work / "images").rmdir()
        else:
            grid = make_grid(images, labels, rows, flow.get("class_names"), by_class)
            grid.save(work / "grid.png")
            written = ["grid.png", f"images/ ({len(labels)} PNGs)", "samples.npz", *written]
        shutil.rmtree(work / "batches")
        seconds = time.perf_counter() - tic
        record = {"config": asdict(cfg), "dit_checkpoint": str(Path(ckpt).resolve()), "flow": flow,
                  "samples": len(labels), "world": d.world, "resumed_batches": len(done),
                  "seconds": seconds, "generate_seconds": generated,
                  "network_seconds_rank0": network}  # fmt: skip
        (work / "sample.json").write_text(json.dumps(record, indent=2, default=str))
        _swap_in(work, out)
    _barrier(d)  # --out is in place before any rank returns
    seconds = time.perf_counter() - tic
    return {"out": cfg.out, "samples": len(labels), "seconds": seconds, "written": written,
            "images": decoder is not None, "network_seconds": network,
            "generate_seconds": generated, "resumed_batches": len(done)}  # fmt: skip
