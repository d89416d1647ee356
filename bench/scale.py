"""Read amplification at ImageNet-like row counts: bytes each rank reads ÷ bytes it needs.

One run, on synthetic stores of --rows rows (small P and C: the row count and the layout are
what matter) with a simulated world of --world ranks, for the three readers of the trainers:
  - the VAE loader (FeatureBatches: one drawn view per row per epoch),
  - VAE validation (`train_vae.evaluate`: view 0 of the rank's share of the valid rows),
  - LatentBatches (every stored view of the rank's share, read once at start-up),
each measured for this code and for the access pattern of the code before issue 13 (round-robin
rows, chunks holding every view), by counting the bytes the Zarr store hands out. Also the VAE
loader's samples/s against a plain sequential read of the same rank's bytes, and the file count
of a feature store (measured here, and computed for 1.28M images x 2 views).

    python bench/scale.py [--rows 100000] [--world 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.storage import LocalStore

from flatdino.pipeline.feature_store import FeatureStore
from flatdino.pipeline.latent_store import LatentStore
from flatdino.pipeline.loader import FeatureBatches, LatentBatches, LoaderConfig, plan_epoch
from flatdino.trainers.runner import Dist
from flatdino.trainers.train_vae import evaluate

P, C, T, D, V, SHARD = 64, 32, 8, 16, 2, 64  # a row-view of 4 KB (ImageNet: 393 KB)
COUNT = {"bytes": 0}
_get = LocalStore.get


async def _counted_get(self, key, prototype=None, byte_range=None):
    got = await _get(self, key, prototype, byte_range)
    if got is not None and not key.endswith("zarr.json"):
        COUNT["bytes"] += len(got.to_bytes())
    return got


LocalStore.get = _counted_get  # every read of the stores below is counted
torch.distributed.all_reduce = lambda tensor, *a, **k: None  # simulated ranks: no group


def measured(fn) -> int:
    COUNT["bytes"] = 0
    fn()
    return COUNT["bytes"]


def feature_store(path: Path, rows: int) -> FeatureStore:
    store = FeatureStore.create(
        path,
        shape=(rows, V, P, C),
        labels=np.zeros(rows, np.int32),
        paths=[str(i) for i in range(rows)],
        class_names=["a"],
        shard_size=SHARD,
        chunk_rows=1,
        attrs={"fingerprint": {}},
    )
    block = np.ones((SHARD, V, P, C), np.float16)
    for s in store.shards():
        store.write_shard(s, block[: s.stop - s.start], np.ones(s.stop - s.start, bool), {})
    store.finalize()
    return store


def latent_store(path: Path, rows: int) -> zarr.Group:
    attrs = {"kind": "flatdino.latents", "shard_size": SHARD}  # what LatentStore reads
    group = zarr.create_group(str(path), zarr_format=3, attributes=attrs)
    group.create_array(
        "mu", shape=(rows, V, T, D), chunks=(SHARD, V, T, D), dtype="float32", compressors=None
    )  # bytes read = bytes of latents
    group["mu"][:] = 1.0
    for name, dtype in (("labels", "int32"), ("valid", "bool")):
        group.create_array(name, shape=(rows,), chunks=(rows,), dtype=dtype)
    group["valid"][:] = True
    return group


class Identity(torch.nn.Module):
    """A VAE stand-in for validation: x_hat = x (the reads are what is measured)."""

    def forward(self, x, sample=False):
        return x, None, None


def old_loader_pattern(store: FeatureStore, cfg: LoaderConfig) -> None:
    """Before: the rank's blocks of 8-row chunks that held every view, each read whole."""
    for b in plan_epoch(store.valid_mask(), V, 8, cfg, 0).blocks:
        store.features[b * 8 : (b + 1) * 8]  # (8, V, P, C): every view of the chunk


def old_validation_pattern(store: FeatureStore, rank: int, world: int, batch: int = 64) -> None:
    """Before: round-robin rows, each batch read as one span from its first to its last row."""
    rows = store.valid_rows()[rank::world]
    for i in range(0, len(rows), batch):
        store.features[rows[i] : rows[min(i + batch, len(rows)) - 1] + 1, 0]


def old_latents_pattern(path: str, rank: int, world: int) -> None:
    """Before: round-robin rows, so every chunk holds rows of every rank and is read by all."""
    mu = zarr.open_array(f"{path}/mu", mode="r")
    rows = np.arange(mu.shape[0])[rank::world]
    for lo in range(0, mu.shape[0], SHARD):
        if ((rows >= lo) & (rows < lo + SHARD)).any():
            mu[lo : lo + SHARD]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--world", type=int, default=8)
    args = parser.parse_args()
    n, w = args.rows, args.world
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        store = feature_store(Path(tmp) / "features.zarr", n)
        latent_path = Path(tmp) / "latents.zarr"
        latent_store(latent_path, n)
        print(f"stores of {n} rows written in {time.perf_counter() - tic:.1f}s")
        files = sum(1 for p in store.path.rglob("*") if p.is_file())
        print(f"feature store files: {files} measured ({n} rows, shards of {SHARD})")
        shards = -(-1_281_167 // SHARD)
        print(
            f"  1.28M images x 2 views: format 2 {4 * shards + 8:,} files "
            f"(features, valid, done, errors: one per shard), format 1 "
            f"{-(-1_281_167 // 8) + 3 * shards + 8:,} (8-row feature chunks)"
        )
        row_bytes = P * C * 2
        print(f"\nread amplification, {w} simulated ranks (bytes read / bytes needed):")
        print(f"  {'reader':22s} {'now (max rank)':>15s} {'before (max rank)':>18s}")
        vae_now, vae_old, val_now, val_old, lat_now, lat_old = [], [], [], [], [], []
        for r in range(w):
            cfg = LoaderConfig(256, seed=0, shuffle_buffer=1024, num_workers=0, rank=r, world=w)
            loader = FeatureBatches(store, cfg)
            need = sum(len(rows) for _, _, rows in loader.epoch(0)) * row_bytes
            vae_now.append(measured(lambda loader=loader: [b for b in loader.epoch(0)]) / need)
            vae_old.append(measured(lambda cfg=cfg: old_loader_pattern(store, cfg)) / need)
            share = len(np.array_split(np.arange(n), w)[r]) * row_bytes
            d = Dist(r, w)
            val_now.append(
                measured(lambda d=d: evaluate(Identity(), str(store.path), d, 256)) / share
            )
            val_old.append(measured(lambda r=r: old_validation_pattern(store, r, w)) / share)
            lat_need = (n // w) * V * T * D * 4
            lat_cfg = LoaderConfig(256, rank=r, world=w)
            lat_now.append(
                measured(lambda c=lat_cfg: LatentBatches(LatentStore(latent_path), c)) / lat_need
            )
            lat_old.append(
                measured(lambda r=r: old_latents_pattern(str(latent_path), r, w)) / lat_need
            )
        for name, now, old in (
            ("VAE loader", vae_now, vae_old),
            ("VAE validation", val_now, val_old),
            ("LatentBatches", lat_now, lat_old),
        ):
            print(f"  {name:22s} {max(now):15.3f} {max(old):18.3f}")
        cfg = LoaderConfig(256, seed=0, shuffle_buffer=1024, num_workers=0, rank=0, world=w)
        loader = FeatureBatches(store, cfg)
        tic = time.perf_counter()
        rows = sum(len(r) for _, _, r in loader.epoch(0))
        loader_rate = rows / (time.perf_counter() - tic)
        tic = time.perf_counter()
        share = np.array_split(np.arange(n), w)[0]
        for lo in range(share[0], share[-1] + 1, SHARD):
            store.features[lo : min(lo + SHARD, share[-1] + 1), 0]
        seq_rate = len(share) / (time.perf_counter() - tic)
        print(
            f"\nVAE loader, rank 0 of {w}: {loader_rate:,.0f} samples/s; a sequential read of the "
            f"same number of rows (view 0): {seq_rate:,.0f} rows/s; ratio {loader_rate / seq_rate:.2f}"
        )


if __name__ == "__main__":
    main()
