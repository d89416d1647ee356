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
    sample.json       the config (sampler and guide included), the identities of the
                      checkpoints used and the timings

--sampler heun takes second-order steps (two network evaluations a step but the last). With
--guide-dit, a weaker DiT on the same latents replaces the unconditional branch of the guidance
(AutoGuidance, Karras et al. 2024): v_weak + w·(v_main - v_weak) inside --cfg-interval.

Sample i's noise depends only on (seed, i), and the samples are generated in fixed batches of
--batch-size (batch b holds samples b·B .. b·B + B - 1). Under torchrun the batches still to do
are dealt to the ranks in turn (rank r takes every world-th), so every batch is computed exactly
as in a one-process run and the outputs are identical, bit for bit, for any number of ranks
(all ranks must see --out's folder: one node, or a shared file system). Each finished batch is written to a work folder beside
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
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.distributed as torch_dist
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..models.flow import SAMPLERS, flow_sample, sample_noise
from ..pipeline.checkpoints import (
    load_dit,
    load_pixel_decoder,
    load_vae,
    resolve_checkpoint,
    resolve_vae,
)
from ..pipeline.env import autocast, fast_matmul, inference_dtype
from ..pipeline.errors import FlatDinoError
from ..trainers.runner import Dist, setup_distributed, teardown_distributed
from .configs import SampleConfig

log = logging.getLogger(__name__)


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


def _load_vae(cfg: SampleConfig, flow: dict) -> tuple[torch.nn.Module, Path]:
    """The VAE the latents were encoded with (checked by checksum), or the one --vae names; and
    its checkpoint folder."""
    path = cfg.vae or flow.get("vae_checkpoint")
    if not path:
        raise FlatDinoError("the DiT checkpoint names no VAE; pass --vae RUN_DIR")
    try:
        ckpt = resolve_vae(path)
        model, sha = load_vae(ckpt)
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
    return model, ckpt


class NpyWriter:
    """An .npy file written front to back into `file`, batch by batch, its header stating the
    final shape. Plain sequential writes, not a memory map: a full disk raises OSError (ENOSPC)
    where a written memory map would kill the process with SIGBUS."""

    def __init__(self, file: BinaryIO, dtype: np.dtype, shape: tuple[int, ...]):
        self.file = file
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": tuple(shape),
        }
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
            f.flush()
            os.fsync(f.fileno())  # on disk before its name says the batch is done
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
def generate(
    cfg: SampleConfig,
    dit,
    norm,
    vae,
    decoder,
    labels: np.ndarray,
    kappa: float,
    device: torch.device,
    work: Path,
    todo: list[int],
    dtype: torch.dtype | None = None,
    show_progress: bool = True,
    guide=None,
) -> float:
    """Generate the batches `todo` (numbers into `batches_of`) into `work`: per batch its PNGs
    (with a decoder) and batches/BBBBBB.npz holding `pixels` uint8 (B, H, W, 3) with a decoder,
    `latents` float32 (B, T, d) and `features` float16 (B, P, C) with --save-features or without
    one. `guide`: AutoGuidance's weaker DiT, or None for CFG. The networks run under autocast
    `dtype` (None: fp32). Returns the seconds spent in the networks (the rest is the writers' and
    the host's share)."""
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
            x1 = flow_sample(
                dit,
                x0.to(device),
                y.to(device),
                cfg.steps,
                kappa,
                cfg.cfg,
                cfg.cfg_interval,
                dit.null_class,
                autocast=dtype,
                sampler=cfg.sampler,
                guide=guide,
            )
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
            path = batch_file(work, b)
            try:  # every member read whole here: a damaged one fails its CRC check now
                with np.load(path) as batch:
                    arrays = {name: batch[name] for name in batch.files}
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                path.unlink(missing_ok=True)
                raise FlatDinoError(
                    f"batch file {str(path)!r} was damaged ({e}) and is removed; rerun the same "
                    "command to generate that batch again"
                ) from e
            for name, value in arrays.items():
                if name not in writers:
                    writers[name] = _open_array(files, work / names[name], name, value, labels)
                writers[name].write(value)
                if name == "pixels":  # copies: a view would keep the whole batch alive
                    kept.update((k, value[j].copy()) for j, k in enumerate(rows) if k in shown)
    return kept


def _open_array(
    files: ExitStack, path: Path, name: str, first: np.ndarray, labels: np.ndarray
) -> NpyWriter:
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


def make_grid(
    images, labels: np.ndarray, rows: list, names: list[str] | None, by_class: bool
) -> Image.Image:
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


def _identity(path: Path) -> list:
    """A checkpoint's identity: its resolved path and its files' names, sizes and mtimes (a
    checkpoint saved again into the same folder is another model)."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [str(path.resolve()), *[(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]


def run_key(
    cfg: SampleConfig,
    labels: np.ndarray,
    dtype: torch.dtype | None,
    device: torch.device,
    checkpoints: list[Path],
) -> str:
    """What decides the outputs' bits, each in a canonical form so that two spellings of one run
    (a relative or absolute path, "1,2" or "1, 2", --precision auto or what it resolves to) share
    the key: the config's numbers, the labels drawn, the autocast dtype, the device type and the
    identities of the DiT, VAE, decoder and guide checkpoints. Not --out, the progress bar, the
    writer threads or the number of ranks."""
    fields = asdict(cfg)
    for name in (
        "out",
        "progress",
        "writers",
        "device",
        "dit",
        "vae",
        "decoder",
        "guide_dit",
        "classes",
        "per_class",
        "n",
        "precision",
    ):
        fields.pop(name)
    fields["labels"] = hashlib.sha256(np.ascontiguousarray(labels, np.int64).tobytes()).hexdigest()
    fields["dtype"] = str(dtype)
    fields["grid_by_class"] = cfg.classes is not None  # "all" and None draw the same labels
    ident = [_identity(p) for p in checkpoints]
    text = json.dumps([fields, device.type, ident], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _stale_work(out: Path, key: str) -> list[Path]:
    """Work folders beside --out of other configs (and older versions' temporary folders)."""
    work = _work_folder(out, key)
    found = [*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.tmp-*")]
    return [p for p in found if p != work]


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _work_folder(out: Path, key: str) -> Path:
    return out.parent / f".{out.name}.partial-{key}"


def _batch_ok(path: Path, names: set[str]) -> bool:
    """Whether a batch file is whole: a readable zip holding exactly the arrays of this run."""
    try:
        with zipfile.ZipFile(path) as z:
            return {Path(n).stem for n in z.namelist()} == names
    except (OSError, zipfile.BadZipFile):
        return False


def _open_work(out: Path, key: str, names: set[str]) -> tuple[Path, set[int]]:
    """The work folder of this config beside --out, kept from an interrupted run or made new, and
    the numbers of its whole batch files; other configs' work folders are removed (with a
    warning), and so are a batch file a killed run left half-written."""
    work = _work_folder(out, key)
    for stale in _stale_work(out, key):
        batches = len(list((stale / "batches").glob("*.npz")))
        log.warning(
            "removing %s (%d batch files): an unfinished sample run with another config",
            stale,
            batches,
        )
        shutil.rmtree(stale, ignore_errors=True)
    (work / "images").mkdir(parents=True, exist_ok=True)
    (work / "batches").mkdir(exist_ok=True)
    for tmp in (work / "batches").glob("*.tmp"):  # a batch a killed run was writing
        tmp.unlink()
    done = set()
    for path in sorted((work / "batches").glob("*.npz")):
        if _batch_ok(path, names):
            done.add(int(path.stem))
        else:
            log.warning("%s is damaged; its batch is generated again", path)
            path.unlink()
    return work, done


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
        vae.cfg.num_patches,
        vae.cfg.in_dim,
    ):
        raise FlatDinoError(
            f"--decoder expects ({decoder.cfg.num_patches}, {decoder.cfg.in_dim}) features but the "
            f"VAE produces ({vae.cfg.num_patches}, {vae.cfg.in_dim}); use a decoder for this backbone"
        )
    if cfg.cfg != 1.0 and not flow.get("class_dropout") and not cfg.guide_dit:
        raise FlatDinoError(
            "the DiT was trained without class dropout, so its null class never learned; "
            "sample with --cfg 1, or guide with a weaker model (--guide-dit)"
        )


def _load_guide(cfg: SampleConfig, dit, flow: dict) -> tuple[torch.nn.Module | None, Path | None]:
    """AutoGuidance's weaker DiT (--guide-dit) and its checkpoint folder, checked to predict
    velocities in the main DiT's space: the same (T, d, classes) and the same latents."""
    if not cfg.guide_dit:
        return None, None
    ckpt = resolve_checkpoint(cfg.guide_dit, "--guide-dit", "train-dit")
    if not (ckpt / "flow.json").exists():
        raise FlatDinoError(
            f"--guide-dit {cfg.guide_dit!r} is not a train-dit checkpoint (no flow.json); pass a "
            "train-dit run folder or one of its RUN/steps/NNNNNNN"
        )
    guide, guide_flow, _, _ = load_dit(str(ckpt), cfg.ema)
    shape = (dit.cfg.tokens, dit.cfg.latent_dim, dit.cfg.num_classes)
    found = (guide.cfg.tokens, guide.cfg.latent_dim, guide.cfg.num_classes)
    if found != shape:
        raise FlatDinoError(
            f"--guide-dit {cfg.guide_dit!r} is a DiT for (tokens, latent_dim, classes) = {found} "
            f"but --dit is one for {shape}; guide with a DiT trained on the same latents"
        )
    for key, fix in (
        ("latents_fingerprint", "--latents"),
        ("normalize", "--latents and --normalize"),
    ):
        if guide_flow.get(key) != flow.get(key):
            raise FlatDinoError(
                f"--guide-dit {cfg.guide_dit!r} was not trained on the latents --dit was (their "
                f"flow.json's {key} differ); guide with a DiT trained with the same {fix}"
            )
    return guide, ckpt


# Rank 0 alone checks the disk, opens the work folder and assembles the outputs, which for 50K
# samples takes minutes; the other ranks wait for it on a gloo group with a long timeout (an NCCL
# barrier would be aborted by its watchdog after 10 minutes), and every wait also carries errors.
COORDINATION_TIMEOUT = timedelta(hours=24)


def _agree(d: Dist, group, error: Exception | None, payload=None):
    """Wait for every rank; when any failed, raise on all (the failing rank its own error, the
    others a one-line error naming it). Returns rank 0's `payload`."""
    if d.world == 1:
        if error is not None:
            raise error
        return payload
    shared: list = [None] * d.world
    message = None if error is None else f"{type(error).__name__}: {error}"
    torch_dist.all_gather_object(shared, (message, payload), group=group)
    if error is not None:
        raise error
    for rank, (message, _) in enumerate(shared):
        if message is not None:
            raise FlatDinoError(f"sample: rank {rank} failed: {message}")
    return shared[0][1]


def sample(cfg: SampleConfig) -> dict:
    """Generate as `cfg` says and write the outputs (under torchrun: this rank's share, then rank 0
    assembles them); returns a summary."""
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.writers < 1:
        raise FlatDinoError("--steps, --batch-size and --writers must be at least 1")
    if cfg.sampler not in SAMPLERS:
        raise FlatDinoError(f"--sampler must be one of {', '.join(SAMPLERS)}; got {cfg.sampler!r}")
    d = setup_distributed(cfg.device)
    group = None
    try:
        if d.world > 1:
            group = torch_dist.new_group(backend="gloo", timeout=COORDINATION_TIMEOUT)
        with fast_matmul(d.device, cfg.precision):
            return _sample(cfg, d, group)
    finally:
        if group is not None and not d.owns_group:
            torch_dist.destroy_process_group(group)
        teardown_distributed(d)


@dataclass
class _Run:
    """What `_prepare` loaded and decided."""

    dit: torch.nn.Module
    flow: dict
    norm: torch.nn.Module
    vae: torch.nn.Module
    decoder: torch.nn.Module | None
    guide: torch.nn.Module | None  # AutoGuidance's weaker DiT
    guide_ckpt: Path | None
    labels: np.ndarray
    key: str
    dtype: torch.dtype | None
    checkpoints: list[Path]  # the DiT's, the VAE's, the decoder's and the guide's

    def arrays(self, save_features: bool) -> set[str]:
        """The arrays in each batch file."""
        names = {"pixels"} if self.decoder is not None else set()
        return names | ({"latents", "features"} if save_features or self.decoder is None else set())


def _prepare(cfg: SampleConfig, d: Dist) -> _Run:
    """Load and check the models and the labels; every rank does the same."""
    dtype = inference_dtype(cfg.precision, d.device)
    dit, flow, norm, ckpt = load_dit(cfg.dit, cfg.ema)
    labels = class_labels(cfg, dit.cfg.num_classes)
    vae, vae_ckpt = _load_vae(cfg, flow)
    decoder, decoder_path = None, None
    if cfg.decoder:
        decoder = load_pixel_decoder(cfg.decoder)[0]
        decoder_path = Path(cfg.decoder)
        if not decoder_path.is_file():
            decoder_path = resolve_checkpoint(cfg.decoder, "--decoder", "train-decoder")
    _check_pair(decoder, vae, flow, cfg)
    guide, guide_ckpt = _load_guide(cfg, dit, flow)
    for m in (dit, norm, vae, decoder, guide):
        if m is not None:
            m.to(d.device)
    _check_out(Path(cfg.out))
    checkpoints = [Path(ckpt), vae_ckpt] + ([decoder_path] if decoder_path else [])
    checkpoints += [guide_ckpt] if guide_ckpt else []
    key = run_key(cfg, labels, dtype, d.device, checkpoints)
    return _Run(dit, flow, norm, vae, decoder, guide, guide_ckpt, labels, key, dtype, checkpoints)


def _previous(out: Path, key: str) -> dict | None:
    """The record of a finished run of this very config in --out, if that is what is there."""
    try:
        record = json.loads((out / "sample.json").read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("key") == key else None


def _open(cfg: SampleConfig, run: _Run) -> tuple[set[int] | None, int, str]:
    """Rank 0: (the batches already on disk, or None when --out already holds this very run; the
    number of batches; rank 0's run key, which every rank checks against its own). Checks the free space before anything is removed or written."""
    out = Path(cfg.out)
    batches = batches_of(len(run.labels), cfg.batch_size)
    if _previous(out, run.key) is not None:
        return None, len(batches), run.key
    names = run.arrays(cfg.save_features)
    work = _work_folder(out, run.key)
    on_disk = {int(p.stem) for p in (work / "batches").glob("*.npz")} if work.is_dir() else set()
    left = sum(len(batches[b]) for b in range(len(batches)) if b not in on_disk)
    keep_features = "latents" in names
    needed = bytes_needed(left, len(run.labels), run.dit, run.vae, run.decoder, keep_features)
    freed = sum(_folder_bytes(p) for p in _stale_work(out, run.key))  # removed first
    existing = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    check_free_space(existing, needed - freed, cfg.out)
    work, done = _open_work(out, run.key, names)
    if done:
        log.info("resuming %s: %d of %d batches already written", work, len(done), len(batches))
    return done, len(batches), run.key


def _sample(cfg: SampleConfig, d: Dist, group) -> dict:
    out = Path(cfg.out)
    run, error, opened = None, None, None
    try:
        run = _prepare(cfg, d)
        if d.main:
            opened = _open(cfg, run)
    except Exception as e:  # shared with the other ranks, which would otherwise wait forever
        error = e
    done, total, key = _agree(d, group, error, opened)
    if key != run.key:  # e.g. the checkpoint was saved again while the ranks loaded it
        error = FlatDinoError(
            f"rank {d.rank} loaded other checkpoint files than rank 0 (run key {run.key}, rank 0 "
            f"{key}); sample from a checkpoint that is not being written, e.g. RUN/steps/NNNNNNN"
        )
    _agree(d, group, error)
    labels, work = run.labels, _work_folder(out, run.key)
    if done is None:
        log.info("%s already holds this run; nothing to do", out)
        return _summary(cfg, run, {"resumed_batches": total}, 0.0)
    remaining = [b for b in range(total) if b not in done]
    todo = remaining[d.rank :: d.world]  # balanced whatever an interrupted run left
    tic = time.perf_counter()
    network, error = 0.0, None
    try:
        network = generate(
            cfg,
            run.dit,
            run.norm,
            run.vae,
            run.decoder,
            labels,
            float(run.flow["kappa"]),
            d.device,
            work,
            todo,
            run.dtype,
            show_progress=d.main,
            guide=run.guide,
        )
    except Exception as e:
        error = e
    generated = time.perf_counter() - tic
    _agree(d, group, error)  # every rank's batches are on disk
    record = None
    try:
        if d.main:
            record = _finish(cfg, run, work, len(done), generated, network, tic, d.world)
    except Exception as e:
        error = e
    record = _agree(d, group, error, record)  # --out is in place before any rank returns
    return _summary(cfg, run, record, network)


def _finish(
    cfg: SampleConfig,
    run: _Run,
    work: Path,
    resumed: int,
    generated: float,
    network: float,
    tic: float,
    world: int,
) -> dict:
    """Rank 0: assemble the outputs and the grid in the work folder and swap it in as --out."""
    labels, by_class = run.labels, cfg.classes is not None
    rows = grid_indices(labels, by_class)
    shown = frozenset(int(i) for row in rows for i in row)
    images = assemble(work, labels, cfg.batch_size, shown)
    if run.decoder is None:
        (work / "images").rmdir()
    else:
        grid = make_grid(images, labels, rows, run.flow.get("class_names"), by_class)
        grid.save(work / "grid.png")
    shutil.rmtree(work / "batches")
    guide = str(run.guide_ckpt.resolve()) if run.guide_ckpt else None
    record = {
        "config": asdict(cfg),
        "key": run.key,
        "sampler": cfg.sampler,
        "guide": guide,
        "checkpoints": [str(p.resolve()) for p in run.checkpoints],
        "flow": run.flow,
        "samples": len(labels),
        "world": world,
        "resumed_batches": resumed,
        "seconds": time.perf_counter() - tic,
        "generate_seconds": generated,
        "network_seconds_rank0": network,
    }
    (work / "sample.json").write_text(json.dumps(record, indent=2, default=str))
    _swap_in(work, Path(cfg.out))
    return record


def _summary(cfg: SampleConfig, run: _Run, record: dict, network: float) -> dict:
    written = (
        ["grid.png", f"images/ ({len(run.labels)} PNGs)", "samples.npz"]
        if run.decoder is not None
        else []
    )
    if "latents" in run.arrays(cfg.save_features):
        written += ["latents.npy", "features.npy"]
    return {
        "out": cfg.out,
        "samples": len(run.labels),
        "seconds": record.get("seconds", 0.0),
        "written": written,
        "images": run.decoder is not None,
        "network_seconds": network,
        "generate_seconds": record.get("generate_seconds", 0.0),
        "resumed_batches": record.get("resumed_batches", 0),
    }
