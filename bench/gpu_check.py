"""One prepared check for a machine with a GPU: every command, then the paper's models, one table.

1. The whole chain on the built-in digits with tiny presets, through the same config functions the
   CLI calls: extract-features, train-vae, encode-latents, train-dit, train-decoder, sample, eval
   fid (FD-DINOv2 of the samples against the val features).
2. A few optimiser steps of the full presets (flatdino-32x128 VAE on 256 x 768 features; dit-xl,
   dit-dh-xl and dit-xl with the CLS token on 32 x 128 latents; the rae-vitxl pixel decoder) on
   random data in bf16 autocast, without and with torch.compile (not repeated for the CLS token),
   and one 50-step Euler batch of dit-xl with CFG (the rate a 50K-sample FID run goes at).

Each stage prints a row: ok/failed (with the error), seconds (warm-up and compilation included),
samples/s (timed steps only) and the peak GPU memory. A failed stage does not stop the others;
the exit code is 1 when any failed. Written to fit in 10 minutes on one GPU.

    python bench/gpu_check.py [--device cuda] [--out gpu_check.json] [--no-compile]
    python bench/gpu_check.py --device cpu --reduced    # the CPU form the tests run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from flatdino.eval.fid import FidConfig, fid
from flatdino.models.configs import generator_preset
from flatdino.models.dit import LightningDiT, dit_preset
from flatdino.models.dit_dh import build_generator
from flatdino.models.flow import euler_sample, flow_loss
from flatdino.models.pixel_decoder import PixelDecoder, pixel_decoder_preset
from flatdino.models.vae import FlatDinoVAE, kl_weight, vae_loss, vae_preset
from flatdino.pipeline.encode import EncodeConfig, encode_latents
from flatdino.pipeline.env import autocast, inference_dtype
from flatdino.pipeline.extract import ExtractConfig, extract_features
from flatdino.sampling.sample import SampleConfig, sample
from flatdino.trainers.train_decoder import TrainDecoderConfig, train_decoder
from flatdino.trainers.train_dit import TrainDiTConfig, train_dit
from flatdino.trainers.train_vae import TrainVAEConfig, train_vae


@dataclass
class Row:
    stage: str
    ok: bool
    seconds: float
    samples_per_s: float | None
    peak_gib: float | None
    error: str = ""


def measure(stage: str, device: torch.device, fn: Callable[[], dict]) -> Row:
    """Run one stage; fn returns {"items": n} (rate over the whole stage) or {"items": n,
    "seconds": s} (rate over its timed part)."""
    cuda = device.type == "cuda"
    tic = time.perf_counter()
    try:  # a CUDA error left by an earlier stage fails this row, not the check
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            tic = time.perf_counter()
        done = fn()
        if cuda:  # inside the try: an asynchronous CUDA error surfaces here, as this stage's
            torch.cuda.synchronize()
        error = ""
    except Exception as e:  # a failed stage is a row, not the end of the check
        traceback.print_exc()
        done, error = {}, f"{type(e).__name__}: {e}".splitlines()[0][:160]
    seconds = time.perf_counter() - tic
    rate = done["items"] / done.get("seconds", seconds) if done.get("items") else None
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    row = Row(stage, not error, seconds, rate, peak, error)
    print(_format(row), flush=True)
    return row


def chain(
    root: Path, device: str, reduced: bool, compile: bool
) -> list[tuple[str, Callable[[], dict]]]:
    """The seven commands on the digits, tiny presets, each a stage; with `compile`, train-vae and
    train-dit again with --compile (the trainers' own compiled path, resumed for more steps)."""
    feats, vae, lat = str(root / "features.zarr"), str(root / "vae"), str(root / "latents.zarr")
    dit, dec, out = str(root / "dit"), str(root / "decoder"), str(root / "samples")
    steps, n, sample_steps = (3, 16, 10) if reduced else (50, 256, 50)
    quiet = {"progress": False, "device": device}

    def run(fn, cfg, items):
        return lambda: (fn(cfg), {"items": items})[1]

    def compiled(fn, cfg, items):  # steps, then as many again resumed from its checkpoint
        more = replace(cfg, run=replace(cfg.run, steps=2 * steps, resume=True))
        return lambda: (fn(cfg), fn(more), {"items": 2 * items})[2]

    return [
        (
            "extract-features (digits, tiny)",
            run(
                extract_features,
                ExtractConfig(
                    data="digits", split="val", out=feats, backbone="tiny", backend="local", **quiet
                ),
                360,
            ),
        ),
        (
            "train-vae (tiny)",
            run(
                train_vae,
                TrainVAEConfig(
                    features=feats,
                    out=vae,
                    preset="tiny",
                    steps=steps,
                    batch_size=32,
                    num_workers=0,
                    **quiet,
                ),
                32 * steps,
            ),
        ),
        (
            "encode-latents",
            run(
                encode_latents,
                EncodeConfig(features=feats, vae=vae, out=lat, backend="local", **quiet),
                360,
            ),
        ),
        (
            "train-dit (tiny)",
            run(
                train_dit,
                TrainDiTConfig(
                    latents=lat, out=dit, preset="tiny", steps=steps, batch_size=32, **quiet
                ),
                32 * steps,
            ),
        ),
        (
            "train-decoder (tiny)",
            run(
                train_decoder,
                TrainDecoderConfig(
                    features=feats,
                    out=dec,
                    preset="tiny",
                    steps=steps,
                    batch_size=8,
                    num_workers=0,
                    **quiet,
                ),
                8 * steps,
            ),
        ),
        *(
            [
                (
                    "train-vae (tiny, --compile, resumed)",
                    compiled(
                        train_vae,
                        TrainVAEConfig(
                            features=feats,
                            out=f"{vae}-compiled",
                            preset="tiny",
                            steps=steps,
                            batch_size=32,
                            num_workers=0,
                            compile=True,
                            **quiet,
                        ),
                        32 * steps,
                    ),
                ),
                (
                    "train-dit (tiny, --compile, resumed)",
                    compiled(
                        train_dit,
                        TrainDiTConfig(
                            latents=lat,
                            out=f"{dit}-compiled",
                            preset="tiny",
                            steps=steps,
                            batch_size=32,
                            compile=True,
                            **quiet,
                        ),
                        32 * steps,
                    ),
                ),
            ]
            if compile
            else []
        ),
        (
            f"sample (tiny, {sample_steps} steps)",
            run(
                sample,
                SampleConfig(dit=dit, out=out, n=n, steps=sample_steps, decoder=dec, **quiet),
                n,
            ),
        ),
        (
            "eval fid (dinov2 space)",
            run(
                fid,
                FidConfig(
                    real=feats, fake=f"{out}/samples.npz", space="dinov2", backbone="tiny", **quiet
                ),
                360 + n,
            ),
        ),
    ]


def _steps(
    model: torch.nn.Module,
    loss: Callable,
    batch: int,
    steps: int,
    device: torch.device,
    compile: bool,
) -> dict:
    """`steps` AdamW steps after one warm-up step (which compiles): the timed rate."""
    model.to(device).train()
    net = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    dtype = inference_dtype("auto", device)

    def step():
        with autocast(dtype, device):
            value = loss(net)
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"items": batch * steps, "seconds": time.perf_counter() - tic}


def full_presets(device: torch.device, reduced: bool, compile: bool) -> list:
    """Training steps of the paper's models (tiny ones when reduced): the VAE, both generator
    kinds (LightningDiT, DiT-DH) and LightningDiT with the CLS token, the pixel decoder; and a
    dit-xl sampling batch."""
    size = "tiny" if reduced else None
    steps = 1 if reduced else 5
    vcfg = vae_preset(size or "flatdino-32x128")
    latents = {"tokens": vcfg.tokens, "latent_dim": vcfg.latent_dim}
    dcfg = dit_preset(size or "dit-xl", **latents)
    hcfg = generator_preset("dit-dh-tiny" if reduced else "dit-dh-xl", **latents)
    pcfg = pixel_decoder_preset(size or "rae-vitxl", in_dim=vcfg.in_dim)
    b_vae, b_dit, b_dec, b_sample = (4, 8, 2, 4) if reduced else (64, 256, 32, 256)
    n_steps = 5 if reduced else 50  # Euler steps of the sampling row
    beta = kl_weight(vcfg.tokens, vcfg.latent_dim)

    def feats(b):
        return torch.randn(b, vcfg.num_patches, vcfg.in_dim, device=device)

    def vae(compiled):
        x = feats(b_vae)

        def loss(net):
            x_hat, mu, logvar = net(x)
            return vae_loss(x, x_hat, mu, logvar, beta)["loss"]

        return lambda: _steps(FlatDinoVAE(vcfg), loss, b_vae, steps, device, compiled)

    def generator(cfg):  # the CLS token, when cfg has one, is the DINOv2 CLS of the features
        def make(compiled):
            x1 = torch.randn(b_dit, cfg.tokens, cfg.latent_dim, device=device)
            if cfg.cls_dim:
                x1 = (x1, torch.randn(b_dit, cfg.cls_dim, device=device))
            y = torch.randint(0, cfg.num_classes, (b_dit,), device=device)
            loss = lambda net: flow_loss(net, x1, y, null_class=cfg.num_classes)  # noqa: E731
            return lambda: _steps(build_generator(cfg), loss, b_dit, steps, device, compiled)

        return make

    def decoder(compiled):
        x = feats(b_dec)
        target = torch.rand(b_dec, 3, pcfg.image_size, pcfg.image_size, device=device)
        loss = lambda net: (net(x).float() - target).abs().mean()  # noqa: E731
        return lambda: _steps(PixelDecoder(pcfg), loss, b_dec, steps, device, compiled)

    def sampler():
        model = LightningDiT(dcfg).to(device).eval()
        x0 = torch.randn(b_sample, dcfg.tokens, dcfg.latent_dim, device=device)
        y = torch.randint(0, dcfg.num_classes, (b_sample,), device=device)
        tic = time.perf_counter()
        euler_sample(
            model,
            x0,
            y,
            n_steps,
            3.0,
            4.5,
            (0.225, 1.0),
            dcfg.num_classes,
            autocast=inference_dtype("auto", device),
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return {"items": b_sample, "seconds": time.perf_counter() - tic}

    dit_name = f"DiT {size or 'dit-xl'}"
    models = [  # (name, batch, make, with a --compile row)
        (f"VAE {size or 'flatdino-32x128'}", b_vae, vae, True),
        (dit_name, b_dit, generator(dcfg), True),
        (f"DiT-DH {'dit-dh-tiny' if reduced else 'dit-dh-xl'}", b_dit, generator(hcfg), True),
        (f"{dit_name} + CLS token", b_dit, generator(replace(dcfg, cls_dim=vcfg.in_dim)), False),
        (f"decoder {size or 'rae-vitxl'}", b_dec, decoder, True),
    ]
    precision = "bf16" if device.type == "cuda" else "fp32"
    stages = []
    for name, batch, make, compilable in models:
        stages.append((f"train {name} {precision}, batch {batch}", make(False)))
        if compile and compilable:
            stages.append((f"train {name} {precision} --compile", make(True)))
    stages.append((f"sample {dit_name}: {n_steps} Euler steps, CFG, batch {b_sample}", sampler))
    return stages


def _format(r: Row) -> str:
    rate = f"{r.samples_per_s:10.1f}" if r.samples_per_s else f"{'':>10}"
    peak = f"{r.peak_gib:8.2f}" if r.peak_gib is not None else f"{'':>8}"
    status = "ok" if r.ok else "FAILED"
    line = f"  {r.stage:58s} {status:6s} {r.seconds:8.1f} {rate} {peak}"
    return line + (f"  {r.error}" if r.error else "")


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reduced", action="store_true", help="tiny models, few steps (CPU test)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--out", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"flatdino GPU check on {name}, torch {torch.__version__}")
    print(f"  {'stage':58s} {'status':6s} {'seconds':>8} {'samples/s':>10} {'peak GiB':>8}")
    rows = []
    compile = not args.no_compile and not args.reduced
    with tempfile.TemporaryDirectory(prefix="flatdino-gpu-check-") as tmp:
        for stage, fn in chain(Path(tmp), args.device, args.reduced, compile):
            rows.append(measure(stage, device, fn))
    for stage, fn in full_presets(device, args.reduced, compile):
        rows.append(measure(stage, device, fn))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    failed = [r.stage for r in rows if not r.ok]
    print(
        f"{len(rows) - len(failed)} of {len(rows)} stages ok"
        + (f"; failed: {failed}" if failed else "")
    )
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return rows


if __name__ == "__main__":
    raise SystemExit(1 if not all(r.ok for r in main()) else 0)
