"""Samples/s the VAE loader delivers, against a plain sequential read and against the trainers.

One run, side by side, on a store of real shape (V=2, P=256, C=768, float16) written to disk:
  - sequential: reading the features array chunk by chunk, in order (the I/O ceiling);
  - loader: FeatureBatches (block permutation, shuffle buffer, one view per image, workers);
  - trainer: forward + backward + AdamW step of the tiny and the full-size (flatdino-32x128) VAE
    on random batches, i.e. what a trainer consumes per second on this machine.
The loader must never be the bottleneck: loader / trainer should be well above 1.

    python bench/vae_loader.py [--images 384] [--batch 64] [--workers 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from flatdino.models.vae import FlatDinoVAE, kl_weight, vae_loss, vae_preset
from flatdino.pipeline.feature_store import FeatureStore
from flatdino.pipeline.loader import FeatureBatches, LoaderConfig
from flatdino.pipeline.store import row_block
from flatdino.trainers.optim import param_groups


def make_store(path: Path, n: int) -> Path:
    store = FeatureStore.create(
        path,
        shape=(n, 2, 256, 768),
        labels=np.zeros(n, np.int32),
        paths=[str(i) for i in range(n)],
        class_names=["x"],
        shard_size=64,
        chunk_rows=1,
        attrs={"fingerprint": {}},
    )
    rng = np.random.default_rng(0)
    for shard in store.shards():
        k = shard.stop - shard.start
        feats = rng.standard_normal((k, 2, 256, 768), dtype=np.float32).astype(np.float16)
        store.write_shard(shard, feats, np.ones(k, bool), {})
    store.finalize()
    return path


def sequential(path: Path) -> float:
    arr = zarr.open_group(str(path))["features"]
    start = time.perf_counter()
    block = row_block(arr)
    for lo in range(0, arr.shape[0], block):
        _ = arr[lo : lo + block]
    return arr.shape[0] / (time.perf_counter() - start)


def loader(path: Path, batch: int, workers: int) -> float:
    batches = FeatureBatches(
        FeatureStore(path), LoaderConfig(batch_size=batch, num_workers=workers, shuffle_buffer=256)
    )
    start, n = time.perf_counter(), 0
    for x, _, _ in batches.epoch(0):
        n += len(x.float())  # the trainer's float conversion included
    return n / (time.perf_counter() - start)


def trainer(preset: str, batch: int, steps: int) -> float:
    cfg = vae_preset(preset, in_dim=768)
    torch.manual_seed(0)
    model = FlatDinoVAE(cfg)
    opt = torch.optim.AdamW(param_groups(model, 0.02), lr=1e-4)
    x = torch.randn(batch, 256, 768)
    beta = kl_weight(cfg.tokens, cfg.latent_dim)

    def step() -> None:
        x_hat, mu, logvar = model(x)
        vae_loss(x, x_hat, mu, logvar, beta)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_store(Path(tmp) / "features.zarr", args.images)
        rows = {
            "sequential read": sequential(path),
            f"loader ({args.workers} workers)": loader(path, args.batch, args.workers),
            "loader (in process)": loader(path, args.batch, 0),
            "tiny trainer": trainer("tiny", args.batch, steps=5),
            "flatdino-32x128 trainer": trainer("flatdino-32x128", 4, steps=2),
        }
    loader_rate = rows[f"loader ({args.workers} workers)"]
    print(f"{'':26s} {'samples/s':>10s} {'loader / this':>14s}")
    for name, rate in rows.items():
        print(f"{name:26s} {rate:10.1f} {loader_rate / rate:14.2f}")
    print(
        f"store: {args.images} images x 2 views x 256 x 768 float16; torch threads {torch.get_num_threads()}"
    )


if __name__ == "__main__":
    main()
