"""Sampler throughput on FlatDINO latents (32 tokens) against the same DiT on 256-token latents.

One run, side by side, for each batch size: the same DiT width and depth, random weights, the
real Euler sampler with CFG on its interval (the conditional and unconditional passes batched),
generating (B, 32, 128) FlatDINO latents and (B, 256, 768) DINOv2-grid latents (RAE's setting).
The paper's Appendix G shows the ratio approaching 8x as the batch grows, when the work is large
enough to keep the device busy.

    python bench/sample_tokens.py [--preset dit-xl] [--batches 1,4,16] [--steps 10] [--device cpu|cuda]
                           [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from flatdino.models.dit import LightningDiT, dit_preset
from flatdino.models.flow import euler_sample


def samples_per_s(model, tokens: int, dim: int, batch: int, steps: int, device, autocast) -> float:
    x0 = torch.randn(batch, tokens, dim, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run():
        with autocast():
            euler_sample(model, x0, y, steps, 3.0, 4.5, (0.225, 1.0), model.null_class)
        sync()

    run()  # warm-up
    tic = time.perf_counter()
    run()
    return batch / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="dit-xl")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--steps", type=int, default=10, help="Euler steps (50 in the paper)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    device = torch.device(args.device)

    def autocast():
        if args.dtype == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    torch.manual_seed(0)
    flat = LightningDiT(dit_preset(args.preset, tokens=32, latent_dim=128)).to(device).eval()
    rae = LightningDiT(dit_preset(args.preset, tokens=256, latent_dim=768)).to(device).eval()
    print(
        f"{args.preset}, {args.steps} Euler steps with CFG 4.5 on [0.225, 1], {args.device} {args.dtype}"
    )
    print(f"  {'batch':>5}  {'32 tokens':>12}  {'256 tokens':>12}  ratio")
    for batch in (int(b) for b in args.batches.split(",")):
        a = samples_per_s(flat, 32, 128, batch, args.steps, device, autocast)
        b = samples_per_s(rae, 256, 768, batch, args.steps, device, autocast)
        print(f"  {batch:5d}  {a:10.3f}/s  {b:10.3f}/s  {a / b:5.2f}x")


if __name__ == "__main__":
    main()
