"""`flatdino sample` end to end: samples/s for 1 and 2 ranks, and the share of wall time outside
the networks (PNG encoding, the npz, the file system), measured side by side in one run.

A tiny chain is built on the digits first (extract, train-vae, encode, train-dit, train-decoder:
tiny presets, a few steps), so the decoder writes real 256 x 256 PNGs. Then `flatdino sample`
runs in one process and under `torchrun --nproc-per-node 2` (gloo), each from scratch, and its
sample.json gives the seconds spent in the networks against the whole run (assembly included).

    python bench/sample.py [--n 256] [--batch-size 32] [--steps 10] [--writers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flatdino.pipeline.encode import EncodeConfig, encode_latents
from flatdino.pipeline.extract import ExtractConfig, extract_features
from flatdino.trainers.train_decoder import TrainDecoderConfig, train_decoder
from flatdino.trainers.train_dit import TrainDiTConfig, train_dit
from flatdino.trainers.train_vae import TrainVAEConfig, train_vae


def build_chain(root: Path) -> None:
    quiet = {"progress": False}
    feats = str(root / "features.zarr")
    extract_features(
        ExtractConfig(
            data="digits", split="val", out=feats, backbone="tiny", backend="local", **quiet
        )
    )
    train_vae(
        TrainVAEConfig(
            features=feats,
            out=str(root / "vae"),
            preset="tiny",
            steps=5,
            batch_size=32,
            num_workers=0,
            device="cpu",
            **quiet,
        )
    )
    encode_latents(
        EncodeConfig(
            features=feats,
            vae=str(root / "vae"),
            out=str(root / "lat.zarr"),
            backend="local",
            device="cpu",
            **quiet,
        )
    )
    train_dit(
        TrainDiTConfig(
            latents=str(root / "lat.zarr"),
            out=str(root / "dit"),
            preset="tiny",
            steps=5,
            batch_size=32,
            device="cpu",
            **quiet,
        )
    )
    train_decoder(
        TrainDecoderConfig(
            features=feats,
            out=str(root / "decoder"),
            preset="tiny",
            steps=3,
            batch_size=8,
            num_workers=0,
            device="cpu",
            **quiet,
        )
    )


def run(ranks: int, root: Path, args) -> dict:
    out = root / f"samples-{ranks}"
    cmd = [
        "sample",
        "--dit",
        str(root / "dit"),
        "--decoder",
        str(root / "decoder"),
        "--out",
        str(out),
        "--num-samples",
        str(args.n),
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--writers",
        str(args.writers),
        "--device",
        "cpu",
        "--no-progress",
    ]
    launcher = [sys.executable, "-m", "flatdino.cli.main"]
    if ranks > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(ranks),
            "-m",
            "flatdino.cli.main",
        ]
    threads = max(1, (os.cpu_count() or 1) // ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    tic = time.perf_counter()
    subprocess.run([*launcher, *cmd], check=True, env=env, capture_output=True)
    wall = time.perf_counter() - tic  # with the start-up and the model loading
    record = json.loads((out / "sample.json").read_text())
    shutil.rmtree(out)
    return {"wall": wall, **record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--writers", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flatdino-bench-sample-") as tmp:
        root = Path(tmp)
        build_chain(root)
        rows = {ranks: run(ranks, root, args) for ranks in (1, 2)}
    print(
        f"flatdino sample: {args.n} samples of 256x256, tiny DiT/VAE/decoder, {args.steps} Euler "
        f"steps, batch {args.batch_size}, CPU ({os.cpu_count()} cores)"
    )
    print(f"  {'ranks':>5}  {'samples/s':>10}  {'run s':>7}  {'networks s':>10}  {'outside':>8}")
    for ranks, r in rows.items():
        outside = 1 - r["network_seconds_rank0"] / r["seconds"]
        print(
            f"  {ranks:5d}  {args.n / r['seconds']:10.2f}  {r['seconds']:7.2f}  "
            f"{r['network_seconds_rank0']:10.2f}  {100 * outside:7.1f}%"
        )
    speedup = rows[1]["seconds"] / rows[2]["seconds"]
    print(f"  2 ranks / 1 rank: {speedup:.2f}x (run time, without start-up and model loading)")


if __name__ == "__main__":
    main()
