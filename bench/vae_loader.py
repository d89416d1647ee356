"""Bytes/s the VAE loader delivers at real row size, against a plain read and the VAE steps.

One run, side by side, on a store of real rows (V=2, P=256, C=768, shards of 64 rows as
extract-features writes them; float16, then int8 codes with their scales) on local disk, every byte read once first so that every measurement
below reads from the page cache (the store must fit in RAM; dropping caches needs root):
  - files: the shard files read whole, in order (raw bytes, every view): the I/O ceiling;
  - plain read: view 0 of every row, block by block, through the store's reader: the same number
    of bytes the loader delivers, read sequentially, into a new array per block (the ratios'
    denominator) and into one warm array;
  - loader: train-vae's loader as train-vae uses it (FeatureBatches: block order, shuffle buffer,
    one drawn view per row, DataLoader workers; one batch ahead on a thread, `prefetch`), with
    0 and N workers; batches as stored, as the trainer receives them (its .float() and int8's
    dequantisation run on the device).
    An epoch starts by filling the shuffle buffer (batch + buffer rows read before the first batch)
    and ends by draining it (its last buffer / batch batches need no read), so its rate is given
    three ways: the steady rate between (what an ImageNet epoch of 2,500 batches runs at), the time
    to the first batch, and the whole epoch. One loader is kept across the repeats, as train-vae
    keeps one across epochs, after one epoch that is not measured (its memory's first touch);
  - VAE steps: forward + backward + AdamW of a ViT-B-size VAE (encoder and decoder ViT-B) and of
    flatdino-32x128 (ViT-B encoder, ViT-L decoder) on CPU, fp32, at a small batch.
Each configuration runs --repeats times, interleaved; the table shows medians.

    python bench/vae_loader.py [--rows 4000] [--batch 512] [--workers 2] [--repeats 3]
        [--dtypes float16,int8]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from flatdino.models.vae import FlatDinoVAE, kl_weight, vae_loss, vae_preset
from flatdino.pipeline.feature_store import FeatureStore
from flatdino.pipeline.loader import FeatureBatches, LoaderConfig, prefetch
from flatdino.pipeline.quantise import parts
from flatdino.trainers.configs import TrainVAEConfig
from flatdino.trainers.optim import param_groups

V, P, C = 2, 256, 768  # views, patches, channels of a real store
ROW_BYTES = {"float16": P * C * 2, "int8": P * C + P * 2}  # one view of one row (int8: + scales)


def make_store(path: Path, n: int, dtype: str = "float16") -> FeatureStore:
    """A complete store of `n` random rows; one random shard reused (the bytes need not differ)."""
    store = FeatureStore.create(
        path,
        shape=(n, V, P, C),
        labels=np.zeros(n, np.int32),
        paths=[str(i) for i in range(n)],
        class_names=["x"],
        shard_size=64,  # extract-features' default
        chunk_rows=1,
        attrs={"fingerprint": {}},
        feature_dtype=dtype,
    )
    block = np.random.default_rng(0).standard_normal((64, V, P, C), np.float32).astype(np.float16)
    for shard in store.shards():
        k = shard.stop - shard.start
        store.write_shard(shard, block[:k], np.ones(k, bool), {})
    store.finalize()
    return FeatureStore(path)


def files(path: Path) -> float:
    """Bytes/s of reading the store's files whole, in order."""
    start, nbytes = time.perf_counter(), 0
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name != "zarr.json":
            nbytes += len(f.read_bytes())
    return nbytes / (time.perf_counter() - start)


def nbytes(batch) -> int:
    """Bytes of a stored batch: float16 features, or int8 codes and their scales."""
    return sum(part.numel() * part.element_size() for part in parts(batch))


def plain(store: FeatureStore, reuse: bool = False) -> float:
    """Bytes/s of view 0 of every row, one storage block at a time, through the store's reader:
    into new arrays per block, or with `reuse` into one warm block-sized array per part."""
    step = store.block_rows
    warm = [np.zeros((step, *shape), dtype) for shape, dtype in store.row_parts]
    start, total = time.perf_counter(), 0
    for lo in range(0, store.num_images, step):
        rows = np.arange(lo, min(lo + step, store.num_images))
        views = np.zeros(len(rows), np.int64)
        if reuse:
            into = [list(array[: len(rows)]) for array in warm]
            store.read_drawn(lo, rows[-1] + 1, rows, views, into=into)
            total += sum(array[: len(rows)].nbytes for array in warm)
        else:
            got = store.read_drawn(lo, rows[-1] + 1, rows, views)
            total += sum(part.nbytes for part in parts(got))
    return total / (time.perf_counter() - start)


def loader(batches: FeatureBatches, epoch: int) -> tuple[float, float, float]:
    """One epoch of train-vae's loader as its training loop draws it (CPU: no pin): bytes/s
    between the fill and the drain of the shuffle buffer, seconds to the first batch, and bytes/s
    of the whole epoch."""
    start, arrived, sizes = time.perf_counter(), [], []
    for x, _, _ in prefetch(batches.epoch(epoch)):
        arrived.append(time.perf_counter() - start)
        sizes.append(nbytes(x))
    drain = -(-batches.cfg.shuffle_buffer // batches.cfg.batch_size)  # batches after the last read
    first, last = 0, len(arrived) - 1 - drain
    assert last > first, "too few batches for a steady rate: pass more --rows"
    steady = sum(sizes[first + 1 : last + 1]) / (arrived[last] - arrived[first])
    return steady, arrived[0], sum(sizes) / arrived[-1]


def vae_step(cfg, batch: int, steps: int) -> float:
    """Samples/s of forward + backward + AdamW steps of the VAE `cfg` on random features."""
    torch.manual_seed(0)
    model = FlatDinoVAE(cfg)
    opt = torch.optim.AdamW(param_groups(model, 0.02), lr=1e-4)
    x = torch.randn(batch, P, C)
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
    parser.add_argument("--rows", type=int, default=4000, help="images in the store")
    parser.add_argument("--batch", type=int, default=512, help="train-vae's default micro batch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vae-batch", type=int, default=4)
    parser.add_argument("--vae-steps", type=int, default=2)
    parser.add_argument("--dtypes", default="float16,int8", help="stores to measure, one each")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/loaderbench"))
    args = parser.parse_args()
    tables = {dtype: measure(args, dtype) for dtype in args.dtypes.split(",")}
    base = vae_preset("flatdino-32x128", in_dim=C)
    vit_b = replace(base, dec_dim=base.enc_dim, dec_depth=base.enc_depth, dec_heads=base.enc_heads)
    steps = {
        "VAE step, ViT-B enc + ViT-B dec": vae_step(vit_b, args.vae_batch, args.vae_steps),
        "VAE step, flatdino-32x128 (B + L)": vae_step(base, args.vae_batch, args.vae_steps),
    }
    for dtype, (rates, notes) in tables.items():
        plain_rate = statistics.median(rates["plain read (view 0)"])
        print(f"{dtype + ':':40s} {'MB/s':>8s} {'samples/s':>10s} {'/ plain read':>13s}  each run")
        for name, values in rates.items():
            rate = statistics.median(values)
            runs = " ".join(f"{v / 1e6:.0f}" for v in values)
            samples = rate / ROW_BYTES[dtype]
            print(f"{name:40s} {rate / 1e6:8.0f} {samples:10.0f} {rate / plain_rate:13.2f}  {runs}")
        print("\n".join(notes))
        size = args.rows * V * ROW_BYTES[dtype] / 1e9
        print(f"store: {args.rows} rows x {V} views x {P} x {C} {dtype} ({size:.2f} GB)\n")
    for name, rate in steps.items():
        print(f"{name:40s} {'':8s} {rate:10.2f}")
    print(
        f"stores read from the page cache; loader batch {args.batch}; VAE batch {args.vae_batch}, "
        f"fp32; torch threads {torch.get_num_threads()}; medians of {args.repeats}"
    )


def measure(args, dtype: str) -> tuple[dict[str, list[float]], list[str]]:
    """The rates of every reader of a `dtype` store, each run, and a note per loader."""
    path = args.dir / f"features-{dtype}.zarr"
    shutil.rmtree(path, ignore_errors=True)
    try:
        store = make_store(path, args.rows, dtype)
        files(path)  # every byte into the page cache once: all reads below come from RAM
        loaders = {  # train-vae's: LoaderConfig(micro, seed, cfg.shuffle_buffer, cfg.num_workers)
            w: FeatureBatches(store, LoaderConfig(args.batch, 0, TrainVAEConfig.shuffle_buffer, w))
            for w in (0, args.workers)
        }
        for batches in loaders.values():  # epoch 0 touches the loader's memory for the first time
            loader(batches, 0)
        rates: dict[str, list[float]] = {}
        epochs: dict[int, list[tuple[float, float, float]]] = {w: [] for w in loaders}
        for rep in range(args.repeats):  # interleaved, so that load from elsewhere hits all alike
            rates.setdefault("files (every view)", []).append(files(path))
            rates.setdefault("plain read (view 0)", []).append(plain(store))
            rates.setdefault("plain read, into one warm buffer", []).append(plain(store, True))
            for w, batches in loaders.items():
                epochs[w].append(loader(batches, 1 + rep))
    finally:
        shutil.rmtree(path, ignore_errors=True)
    notes = []
    for w, runs in epochs.items():
        rates[f"loader, {w} workers, steady"] = [r[0] for r in runs]
        rates[f"loader, {w} workers, whole epoch"] = [r[2] for r in runs]
        first = statistics.median(r[1] for r in runs)
        replaced = loaders[w]._idle[0].ring.replaced  # a batch still held when its buffer was due
        notes.append(
            f"loader, {w} workers: first batch after {first:.2f} s (the shuffle buffer's fill); "
            f"batch buffers replaced: {replaced}"
        )
    return rates, notes


if __name__ == "__main__":
    main()
