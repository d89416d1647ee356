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
    cls.npy           (N, C) float32: the sampled DINOv2 CLS token, beside those two when the DiT
                      generates one (train-dit --cls); features and images do not use it
    sample.json       the config (sampler and guide included), the identities of the
                      checkpoints used and the timings

--sampler heun takes second-order steps (two network evaluations a step but the last). With
--guide-dit, a weaker DiT on the same latents replaces the unconditional branch of the guidance
(AutoGuidance, Karras et al. 2024): v_weak + w·(v_main - v_weak) inside --cfg-interval.

Sample i's noise depends only on (seed, i), and the samples are generated in fixed batches of
--batch-size (batch b holds samples b·B .. b·B + B - 1). Under torchrun the batches still to do
are dealt to the ranks in turn (rank r takes every world-th; sampling/ranks.py), so every batch is
computed exactly as in a one-process run and the outputs are identical, bit for bit, for any
number of ranks (all ranks must see --out's folder: one node, or a shared file system). Finished
batches go to a work folder beside --out that an interrupted run continues from, and the outputs
are swapped in as --out once whole (sampling/outdir.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..models.flow import SAMPLERS
from ..pipeline.checkpoints import FlowRecord
from ..pipeline.env import fast_matmul, inference_dtype
from ..pipeline.errors import FlatDinoError
from ..pipeline.generate import Generator, Guidance, generate, start_noise
from ..trainers.pictures import to_uint8
from ..trainers.runner import Dist
from .bundle import Bundle, load_bundle
from .configs import SampleConfig
from .outdir import (
    BatchWriter,
    assemble,
    batches_of,
    bytes_needed,
    check_free_space,
    check_out,
    folder_bytes,
    grid_indices,
    identity,
    make_grid,
    open_work,
    previous,
    stale_work,
    swap_in,
    work_folder,
)
from .ranks import agree, ranks

log = logging.getLogger(__name__)


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


def check_guidance(flow: FlowRecord, cfg: SampleConfig) -> None:
    """Guidance needs a null class that learned (class dropout in training), or a guide."""
    if cfg.cfg != 1.0 and not flow.class_dropout and not cfg.guide_dit:
        raise FlatDinoError(
            "the DiT was trained without class dropout, so its null class never learned; "
            "sample with --cfg 1, or guide with a weaker model (--guide-dit)"
        )


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
    ident = [identity(p) for p in checkpoints]
    text = json.dumps([fields, device.type, ident], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@torch.no_grad()
def generate_batches(
    cfg: SampleConfig,
    gen: Generator,
    labels: np.ndarray,
    device: torch.device,
    work: Path,
    todo: list[int],
    dtype: torch.dtype | None = None,
    show_progress: bool = True,
) -> float:
    """Generate the batches `todo` (numbers into `batches_of`) into `work`: per batch its PNGs
    (with a decoder) and batches/BBBBBB.npz holding `pixels` uint8 (B, H, W, 3) with a decoder,
    `latents` float32 (B, T, d) and `features` float16 (B, P, C) with --save-features or without
    one (and `cls` float32 (B, C) beside them from a CLS generator). The networks run under
    autocast `dtype` (None: fp32). Returns the seconds spent in the networks (the rest is the
    writers' and the host's share)."""
    keep_features = cfg.save_features or gen.decoder is None
    guidance = Guidance(cfg.steps, cfg.cfg, cfg.cfg_interval, cfg.sampler)
    batches = batches_of(len(labels), cfg.batch_size)
    writer = BatchWriter(work, cfg.writers)
    network = 0.0
    try:
        for b in tqdm(
            todo, desc="sample", unit="batch", disable=not (cfg.progress and show_progress)
        ):
            rows = batches[b]
            x0 = start_noise(cfg.seed, rows, gen.dit.cfg, device)
            y = torch.from_numpy(labels[rows.start : rows.stop])
            tic = time.perf_counter()
            out = generate(gen, x0, y.to(device), guidance, dtype)
            arrays = {}
            if keep_features:
                arrays["latents"] = out.latents.float().cpu().numpy()
                arrays["features"] = out.features.half().cpu().numpy()
                if out.cls is not None:
                    arrays["cls"] = out.cls.float().cpu().numpy()
            if out.pixels is not None:  # (B, 3, H, W) -> (B, H, W, 3) uint8
                arrays["pixels"] = to_uint8(out.pixels)
            network += time.perf_counter() - tic  # the copies to the host wait for the device
            writer.submit(b, rows, labels, arrays)
    finally:
        writer.close()
    return network


def sample(cfg: SampleConfig) -> dict:
    """Generate as `cfg` says and write the outputs (under torchrun: this rank's share, then rank 0
    assembles them); returns a summary."""
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.writers < 1:
        raise FlatDinoError("--steps, --batch-size and --writers must be at least 1")
    if cfg.sampler not in SAMPLERS:
        raise FlatDinoError(f"--sampler must be one of {', '.join(SAMPLERS)}; got {cfg.sampler!r}")
    with ranks(cfg.device, cfg.dist_timeout) as (d, group), fast_matmul(d.device, cfg.precision):
        return _sample(cfg, d, group)


@dataclass
class _Run:
    """What `_prepare` loaded and decided."""

    bundle: Bundle  # the networks, on this rank's device, and their checkpoints
    labels: np.ndarray
    key: str
    dtype: torch.dtype | None

    def arrays(self, save_features: bool) -> set[str]:
        """The arrays in each batch file."""
        decoder = self.bundle.gen.decoder is not None
        names = {"pixels"} if decoder else set()
        kept = {"latents", "features"} | ({"cls"} if self.bundle.gen.dit.cfg.cls_dim else set())
        return names | (kept if save_features or not decoder else set())


def _prepare(cfg: SampleConfig, d: Dist) -> _Run:
    """Load and check the models and the labels; every rank does the same."""
    dtype = inference_dtype(cfg.precision, d.device)
    bundle = load_bundle(cfg.dit, cfg.ema, cfg.vae, cfg.decoder, cfg.guide_dit)
    labels = class_labels(cfg, bundle.gen.dit.cfg.num_classes)
    check_guidance(bundle.flow, cfg)
    bundle.gen.to(d.device)
    check_out(Path(cfg.out))
    key = run_key(cfg, labels, dtype, d.device, bundle.checkpoints)
    return _Run(bundle, labels, key, dtype)


def _open(cfg: SampleConfig, run: _Run) -> tuple[set[int] | None, int, str]:
    """Rank 0: (the batches already on disk, or None when --out already holds this very run; the
    number of batches; rank 0's run key, which every rank checks against its own). Checks the free space before anything is removed or written."""
    out = Path(cfg.out)
    batches = batches_of(len(run.labels), cfg.batch_size)
    if previous(out, run.key) is not None:
        return None, len(batches), run.key
    names = run.arrays(cfg.save_features)
    work = work_folder(out, run.key)
    on_disk = {int(p.stem) for p in (work / "batches").glob("*.npz")} if work.is_dir() else set()
    left = sum(len(batches[b]) for b in range(len(batches)) if b not in on_disk)
    keep_features = "latents" in names
    gen = run.bundle.gen
    needed = bytes_needed(left, len(run.labels), gen.dit, gen.vae, gen.decoder, keep_features)
    freed = sum(folder_bytes(p) for p in stale_work(out, run.key))  # removed first
    existing = next(p for p in (out.parent, *out.parent.parents) if p.exists())
    check_free_space(existing, needed - freed, cfg.out)
    work, done = open_work(out, run.key, names)
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
    done, total, key = agree(d, group, error, opened)
    if key != run.key:  # e.g. the checkpoint was saved again while the ranks loaded it
        error = FlatDinoError(
            f"rank {d.rank} loaded other checkpoint files than rank 0 (run key {run.key}, rank 0 "
            f"{key}); sample from a checkpoint that is not being written, e.g. RUN/steps/NNNNNNN"
        )
    agree(d, group, error)
    labels, work = run.labels, work_folder(out, run.key)
    if done is None:
        log.info("%s already holds this run; nothing to do", out)
        return _summary(cfg, run, {"resumed_batches": total}, 0.0)
    remaining = [b for b in range(total) if b not in done]
    todo = remaining[d.rank :: d.world]  # balanced whatever an interrupted run left
    tic = time.perf_counter()
    network, error = 0.0, None
    try:
        network = generate_batches(
            cfg, run.bundle.gen, labels, d.device, work, todo, run.dtype, show_progress=d.main
        )
    except Exception as e:
        error = e
    generated = time.perf_counter() - tic
    agree(d, group, error)  # every rank's batches are on disk
    record = None
    try:
        if d.main:
            record = _finish(cfg, run, work, len(done), generated, network, tic, d.world)
    except Exception as e:
        error = e
    record = agree(d, group, error, record)  # --out is in place before any rank returns
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
    if run.bundle.gen.decoder is None:
        (work / "images").rmdir()
    else:
        grid = make_grid(images, labels, rows, run.bundle.flow.class_names, by_class)
        grid.save(work / "grid.png")
    shutil.rmtree(work / "batches")
    guide = str(run.bundle.guide_ckpt.resolve()) if run.bundle.guide_ckpt else None
    record = {
        "config": asdict(cfg),
        "key": run.key,
        "sampler": cfg.sampler,
        "guide": guide,
        "checkpoints": [str(p.resolve()) for p in run.bundle.checkpoints],
        "flow": run.bundle.flow.to_json(),
        "samples": len(labels),
        "world": world,
        "resumed_batches": resumed,
        "seconds": time.perf_counter() - tic,
        "generate_seconds": generated,
        "network_seconds_rank0": network,
    }
    (work / "sample.json").write_text(json.dumps(record, indent=2, default=str))
    swap_in(work, Path(cfg.out))
    return record


def _summary(cfg: SampleConfig, run: _Run, record: dict, network: float) -> dict:
    written = (
        ["grid.png", f"images/ ({len(run.labels)} PNGs)", "samples.npz"]
        if run.bundle.gen.decoder is not None
        else []
    )
    arrays = run.arrays(cfg.save_features)
    written += [f"{name}.npy" for name in ("latents", "features", "cls") if name in arrays]
    return {
        "out": cfg.out,
        "samples": len(run.labels),
        "seconds": record.get("seconds", 0.0),
        "written": written,
        "images": run.bundle.gen.decoder is not None,
        "network_seconds": network,
        "generate_seconds": record.get("generate_seconds", 0.0),
        "resumed_batches": record.get("resumed_batches", 0),
    }
