"""`flatdino bench throughput`: DiT forward passes per second against batch size, for 32-token
FlatDINO latents and 256-token DINOv2-grid latents with the same model width and depth (the
paper's Figures 15-17). Random weights; one run measures both side by side."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from ..models.dit import LightningDiT, dit_preset

SHAPES = {"FlatDINO": (32, 128), "RAE": (256, 768)}  # latent (tokens, dim)


@torch.no_grad()
def forward_rate(
    model: LightningDiT, batch: int, device: torch.device, dtype: str, seconds: float
) -> float:
    """Samples per second of forward passes, timed for about `seconds` after one warm-up."""
    T, d = model.cfg.tokens, model.cfg.latent_dim
    x = torch.randn(batch, T, d, device=device)
    t, y = torch.rand(batch, device=device), torch.zeros(batch, dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    with ctx:
        model(x, t, y)
        sync()
        runs, tic = 0, time.perf_counter()
        while runs == 0 or time.perf_counter() - tic < seconds:
            model(x, t, y)
            runs += 1
        sync()
    return runs * batch / (time.perf_counter() - tic)


def throughput(
    preset: str, batches: list[int], device: str = "cpu", dtype: str = "fp32", seconds: float = 2.0
) -> list[dict]:
    """One row per (latent, batch): samples/s of forward passes."""
    dev = torch.device(device)
    rows = []
    for latent, (tokens, dim) in SHAPES.items():
        with torch.random.fork_rng(devices=[]):  # seeded random weights; the caller's RNG is kept
            torch.manual_seed(0)
            model = LightningDiT(dit_preset(preset, tokens=tokens, latent_dim=dim)).to(dev).eval()
        for b in batches:
            rows.append(
                {
                    "preset": preset,
                    "latent": latent,
                    "tokens": tokens,
                    "batch": b,
                    "samples_per_s": forward_rate(model, b, dev, dtype, seconds),
                    "device": device,
                    "dtype": dtype,
                }
            )
        del model
    return rows


def plot_throughput(rows: list[dict], path: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for latent in SHAPES:
        mine = [r for r in rows if r["latent"] == latent]
        ax.plot(
            [r["batch"] for r in mine],
            [r["samples_per_s"] for r in mine],
            marker="o",
            label=f"{latent} ({mine[0]['tokens']} tokens)",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("forward passes (samples/s)")
    ax.set_title(f"{rows[0]['preset']}, {rows[0]['device']} {rows[0]['dtype']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
