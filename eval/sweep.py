"""`flatdino sweep-cfg`: FD-DINOv2 (and FID) over guidance weights x interval starts (Figure 14).

Cell (w, start) is the set `flatdino sample --cfg w --cfg-interval start,1 --n N` draws: the same
class-balanced labels, the same noise per sample (`sample_noise(seed, i)`), the same batches; so a
cell's FD is the one `flatdino eval fid --space dinov2` gives for that run's features.npy. The
decoded DINOv2 features are rounded to float16 and mean-pooled as features.npy is; the reference
is the feature store's valid view-0 rows, pooled the same way and read once. With a pixel decoder,
FID compares the decoded images (uint8, as samples.npz) with the images the store was extracted
from, in pytorch-fid's Inception space. w = 1 runs no unconditional pass, so its row does not
depend on the interval: it is computed once and written for every start.

Outputs in --out: sweep.csv (cfg, interval_start, fd_dinov2[, fid]; one row per cell, rewritten
by rename after every cell), heatmap.png, sweep.json (the config, its key, the reference's count,
the best pair). A rerun of the same config skips the cells already in sweep.csv.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..models.flow import CFG_INTERVAL
from ..pipeline.env import fast_matmul, inference_dtype, resolve_device
from ..pipeline.errors import FlatDinoError
from ..pipeline.feature_store import FeatureStore
from ..pipeline.generate import Generator, Guidance, generate, start_noise
from ..sampling.bundle import load_bundle
from ..sampling.outdir import batches_of, check_out, identity
from ..sampling.sample import class_labels
from ..trainers.pictures import to_uint8
from .configs import SweepConfig
from .fid import FeatureNet, FidConfig, RunningStats, frechet_distance, load_set, npz_crop

log = logging.getLogger(__name__)

FILES = ("sweep.csv", "heatmap.png", "sweep.json")
# Config fields left out of the sweep's identity: the paths are replaced by the identities of the
# files they name, and the rest does not decide the numbers.
NOT_IN_KEY = {"dit", "features", "out", "vae", "decoder", "inception_weights"}
NOT_IN_KEY |= {"device", "precision", "overwrite", "progress"}


def check_config(cfg: SweepConfig) -> None:
    """The refusals that need nothing loaded."""
    for option, values in (("--scales", cfg.scales), ("--interval-starts", cfg.interval_starts)):
        if not values:
            raise FlatDinoError(f"{option} is empty; give comma-separated numbers like 1,2,4.5")
        if len(set(values)) != len(values):
            raise FlatDinoError(f"{option} {_join(values)} lists a value twice")
        if not all(math.isfinite(v) for v in values):
            raise FlatDinoError(f"{option} {_join(values)} holds a value that is not finite")
    if min(cfg.scales) < 1.0:
        raise FlatDinoError(
            f"--scales {_join(cfg.scales)}: guidance weights must be >= 1 (1: no guidance)"
        )
    if not all(0.0 <= s <= 1.0 for s in cfg.interval_starts):
        raise FlatDinoError(
            f"--interval-starts {_join(cfg.interval_starts)}: starts must be in [0, 1] "
            "(t = 0 noise, 1 data)"
        )
    if cfg.n < 2 or cfg.steps < 1 or cfg.batch_size < 1:
        raise FlatDinoError("--n must be at least 2 (a covariance), --steps and --batch-size 1")
    if cfg.inception_weights and not cfg.decoder:
        raise FlatDinoError("--inception-weights needs --decoder: FID is computed on pixels")


def _join(values) -> str:
    return ",".join(f"{v:g}" for v in values)


@dataclass
class _Run:
    """What `_load` loaded and decided."""

    gen: Generator  # the networks of the chain, on the device
    labels: np.ndarray  # (n,) the class of every sample, the same in every cell
    dtype: torch.dtype | None  # autocast dtype of the networks (None: fp32)
    identity: dict  # what decides the numbers; its hash is the sweep's key

    @property
    def key(self) -> str:
        text = json.dumps(self.identity, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _load(cfg: SweepConfig, device: torch.device) -> _Run:
    """The models, checked against each other and against the reference store."""
    bundle = load_bundle(cfg.dit, cfg.ema, cfg.vae, cfg.decoder)
    vae = bundle.gen.vae
    if max(cfg.scales) != 1.0 and not bundle.flow.class_dropout:
        raise FlatDinoError(
            "the DiT was trained without class dropout, so its null class never learned and it "
            "cannot be guided; sweep --scales 1 only, or train-dit with --class-dropout above 0"
        )
    store = FeatureStore.open_complete(cfg.features, "--features")
    _, _, p, c = store.features.shape  # (N, V, P, C)
    if (p, c) != (vae.cfg.num_patches, vae.cfg.in_dim):
        raise FlatDinoError(
            f"--features {cfg.features!r} holds ({p}, {c}) patch features but the VAE decodes "
            f"({vae.cfg.num_patches}, {vae.cfg.in_dim}); pass a store of the VAE's backbone"
        )
    bundle.gen.to(device)
    dtype = inference_dtype(cfg.precision, device)
    fields = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_KEY}
    files = [bundle.dit_ckpt, bundle.vae_ckpt, Path(cfg.features)]
    files += [bundle.decoder_path] if bundle.decoder_path else []
    inception = Path(cfg.inception_weights) if cfg.inception_weights else None
    ident = {
        **fields,
        "dtype": str(dtype),
        "device": device.type,
        "files": [identity(f) for f in files],
        "inception": identity(inception) if inception else None,
    }
    labels = class_labels(cfg.cell(max(cfg.scales), 0.0), bundle.gen.dit.cfg.num_classes)
    return _Run(bundle.gen, labels, dtype, ident)


@dataclass
class _Reference:
    """The reference's statistics (computed once) and the Inception network, with a decoder."""

    dino: tuple[np.ndarray, np.ndarray]
    count: int
    inception: tuple[np.ndarray, np.ndarray] | None = None
    inception_count: int | None = None
    net: FeatureNet | None = None


def _reference(cfg: SweepConfig) -> _Reference:
    """FD-DINOv2's reference exactly as `eval fid --space dinov2 --real STORE` reads it; with a
    decoder, also the store's source images in the Inception space."""
    common = {
        "real": cfg.features,
        "device": cfg.device,
        "batch_size": cfg.batch_size,
        "progress": cfg.progress,
    }
    dino = load_set(cfg.features, FidConfig(space="dinov2", **common))
    ref = _Reference(dino.stats, int(dino.count))
    if cfg.decoder:
        inc_cfg = FidConfig(space="inception", inception_weights=cfg.inception_weights, **common)
        ref.net = FeatureNet(inc_cfg)
        images = load_set(cfg.features, inc_cfg, lambda: ref.net)
        ref.inception, ref.inception_count = images.stats, int(images.count)
    return ref


@torch.no_grad()
def measure(
    cfg: SweepConfig, run: _Run, ref: _Reference, w: float, start: float, device: torch.device
) -> dict[str, float]:
    """FD-DINOv2 (and FID) of cell (w, start): `sample`'s batches through the same chain."""
    guidance = Guidance(cfg.steps, w, (start, CFG_INTERVAL[1]))
    dino = RunningStats(run.gen.vae.cfg.in_dim)
    pixels: RunningStats | None = None  # the Inception space, with a decoder
    for rows in batches_of(cfg.n, cfg.batch_size):
        x0 = start_noise(cfg.seed, rows, run.gen.dit.cfg, device)
        y = torch.from_numpy(run.labels[rows.start : rows.stop]).to(device)
        out = generate(run.gen, x0, y, guidance, run.dtype)
        # float16, then pooled in float32: the numbers features.npy holds and `eval fid` pools
        dino.add(np.asarray(out.features.half().cpu().numpy(), np.float32).mean(1))  # (B, C)
        if out.pixels is not None:  # uint8 (B, H, W, 3), as samples.npz
            images = [ref.net.prepare(npz_crop(im)) for im in to_uint8(out.pixels)]
            vectors = ref.net(images)  # (B, 2048)
            pixels = pixels or RunningStats(vectors.shape[1])
            pixels.add(vectors)
    result = {"fd_dinov2": frechet_distance(ref.dino, dino.result())}
    if pixels is not None:
        result["fid"] = frechet_distance(ref.inception, pixels.result())
    return result


def _read_csv(path: Path) -> dict[tuple[float, float], dict[str, float]]:
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return {(r["cfg"], r["interval_start"]): r for r in rows}


def _write_csv(path: Path, cfg: SweepConfig, rows: dict, columns: list[str]) -> None:
    """All finished cells in grid order, by rename (an interrupted write leaves the old file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for w in cfg.scales:
            for s in cfg.interval_starts:
                if (w, s) in rows:
                    writer.writerow({k: repr(float(rows[w, s][k])) for k in columns})
    os.replace(tmp, path)


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)


def _open_out(cfg: SweepConfig, out: Path, run: _Run) -> dict:
    """The previous record of this config in --out ({} when there is none, or when --overwrite
    replaces another config's sweep or an unreadable record); another config's sweep is refused,
    naming what differs."""
    path = out / "sweep.json"
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError(f"a JSON {type(record).__name__}, not an object")
    except (OSError, ValueError) as e:
        if not cfg.overwrite:
            raise FlatDinoError(f"{str(path)!r} is unreadable ({e}); pass --overwrite") from e
        record = {}  # replaced below, as another config's sweep is
    if record.get("key") == run.key:
        return record
    if not cfg.overwrite:
        old, new = record.get("identity", {}), json.loads(json.dumps(run.identity, default=str))
        names = [
            k.replace("files", "the checkpoints' or the store's files")
            for k in new
            if old.get(k) != new[k]
        ]
        raise FlatDinoError(
            f"--out {str(out)!r} holds a sweep of another config ({', '.join(names)} differ); "
            "pass --overwrite to replace it, or choose another --out"
        )
    for name in FILES:
        (out / name).unlink(missing_ok=True)
    return {}


def best_cell(rows: dict) -> tuple[tuple[float, float], str, float]:
    """The cell with the lowest FID when computed, else the lowest FD-DINOv2."""
    metric = "fid" if all("fid" in r for r in rows.values()) else "fd_dinov2"
    cell = min(rows, key=lambda k: rows[k][metric])
    return cell, metric, rows[cell][metric]


def plot_heatmap(cfg: SweepConfig, rows: dict, path: Path) -> None:
    """One panel per metric: interval starts x scales, each cell's value printed, its minimum
    outlined."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from matplotlib.patches import Rectangle

    metrics = [m for m in ("fd_dinov2", "fid") if all(m in r for r in rows.values())]
    fig = Figure(
        figsize=(1.1 * len(cfg.scales) * len(metrics) + 2, 0.7 * len(cfg.interval_starts) + 1.6)
    )
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics, strict=True):
        grid = np.array([[rows[w, s][metric] for w in cfg.scales] for s in cfg.interval_starts])
        image = ax.imshow(grid, cmap="viridis_r", aspect="auto")  # low (good): bright
        for i, j in np.ndindex(grid.shape):
            dark = image.norm(grid[i, j]) > 0.5
            ax.text(
                j,
                i,
                f"{grid[i, j]:.4g}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if dark else "black",
            )
        i, j = np.unravel_index(np.argmin(grid), grid.shape)
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2.5))
        ax.set_xticks(range(len(cfg.scales)), [f"{w:g}" for w in cfg.scales])
        ax.set_yticks(range(len(cfg.interval_starts)), [f"{s:g}" for s in cfg.interval_starts])
        ax.set_xlabel("guidance weight w")
        ax.set_ylabel("interval start (guided for t >= start)")
        ax.set_title(
            f"{'FD-DINOv2' if metric == 'fd_dinov2' else 'FID'}, {cfg.n} samples, best outlined"
        )
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)


def _todo(cfg: SweepConfig, rows: dict) -> list[tuple[float, float]]:
    """The cells still to compute; w = 1 once (its row is the same for every start)."""
    cells = []
    for w in cfg.scales:
        starts = cfg.interval_starts[:1] if w == 1.0 else cfg.interval_starts
        cells += [(w, s) for s in starts if (w, s) not in rows]
    return cells


def sweep_cfg(cfg: SweepConfig) -> dict:
    """Measure every cell of the grid not yet in --out's sweep.csv and write the outputs;
    returns a summary."""
    check_config(cfg)
    out = Path(cfg.out)
    check_out(out, "sweep.json", "a sweep")
    device = resolve_device(cfg.device)
    with fast_matmul(device, cfg.precision):
        return _sweep(cfg, out, device)


def _sweep(cfg: SweepConfig, out: Path, device: torch.device) -> dict:
    tic = time.perf_counter()
    run = _load(cfg, device)
    previous = _open_out(cfg, out, run)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "config": asdict(cfg),
        "key": run.key,
        "identity": run.identity,
        "reference": previous.get("reference"),
        "best": None,
    }
    _write_json(out / "sweep.json", record)  # first: a crashed --out is recognised as a sweep
    rows = _read_csv(out / "sweep.csv")
    columns = ["cfg", "interval_start", "fd_dinov2"] + (["fid"] if cfg.decoder else [])
    todo = _todo(cfg, rows)
    if todo or record["reference"] is None:
        ref = _reference(cfg)
        record["reference"] = {
            "features": cfg.features,
            "count": ref.count,
            "inception_count": ref.inception_count,
        }
    for w, s in tqdm(todo, desc="sweep", unit="cell", disable=not cfg.progress):
        t0 = time.perf_counter()
        result = measure(cfg, run, ref, w, s, device)
        for start in cfg.interval_starts if w == 1.0 else (s,):
            rows[w, start] = {"cfg": w, "interval_start": start, **result}
        _write_csv(out / "sweep.csv", cfg, rows, columns)
        log.info(
            "cfg=%g interval_start=%g %s seconds=%.1f",
            w,
            s,
            " ".join(f"{k}={v:.4f}" for k, v in result.items()),
            time.perf_counter() - t0,
        )
    cells = {(w, s): rows[w, s] for w in cfg.scales for s in cfg.interval_starts}
    (w, s), metric, value = best_cell(cells)
    plot_heatmap(cfg, cells, out / "heatmap.png")
    record["best"] = {"cfg": w, "interval_start": s, "metric": metric, "value": value}
    record["seconds"] = time.perf_counter() - tic
    _write_json(out / "sweep.json", record)
    return {
        "out": cfg.out,
        "cells": len(cells),
        "cells_run": len(todo),
        "cells_skipped": len(_todo(cfg, {})) - len(todo),
        "best": record["best"],
        "reference_count": record["reference"]["count"],
        "seconds": record["seconds"],
        "written": list(FILES),
    }
