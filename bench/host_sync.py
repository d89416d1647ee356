"""Host syncs per optimiser step and the loop's samples/s, with and without the device-side skip.

One run, side by side, the shared loop (trainers/loop.py) training a DiT on random latents:
  - device skip: fused AdamW reads the non-finite flag on the device (this code's default);
  - per-step check: a plain AdamW, which cannot skip on the device, so the loop checks the flag on
    the host every step (what every step did before issue 13).
Host syncs are counted as the loop's own calls that turn a tensor into a Python value (`item`,
`tolist`, `__bool__`, `__float__`), over a run with one log line at its end. (The plain AdamW's
own per-parameter step counters are CPU tensors, not device syncs, and are not counted.) On CPU a
sync costs nothing (the samples/s are the same within noise; the trainers use fused AdamW there
too, so CPU runs take the GPU's path); on a GPU the per-step sync stops the host from queueing the
next step.

    python bench/host_sync.py [--preset tiny] [--steps 60] [--batch 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from flatdino.models.dit import LightningDiT, dit_preset
from flatdino.models.flow import flow_loss
from flatdino.trainers.loop import LoopConfig, LoopHooks, train_loop
from flatdino.trainers.runner import Dist

SYNCS = ("item", "tolist", "__bool__", "__float__")
LOOP = str(Path("trainers") / "loop.py")


def run(preset: str, steps: int, batch: int, fused: bool, out: Path) -> tuple[float, float]:
    """(samples/s, host syncs per step) of `steps` optimiser steps, logging only at the end."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = dit_preset(preset, tokens=32, latent_dim=128, num_classes=10)
    model = LightningDiT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    x, y = torch.randn(batch, 32, 128), torch.randint(0, 10, (batch,))

    def loss(net, b):
        return {"loss": flow_loss(net, b[0], b[1], 3.0, 0.1, cfg.num_classes, "uniform")}, batch

    hooks = LoopHooks(
        batches=lambda e, s: [(x, y)] * (10_000 - s),
        loss=loss,
        lr=lambda i: 1e-4,
        save=lambda path: None,
    )
    lc = LoopConfig("bench", total=steps, log_every=steps, ckpt_every=10 * steps, progress=False)
    count = {"n": 0}
    real = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counted(name):
        def call(self, *a, **k):
            if sys._getframe(1).f_code.co_filename.endswith(LOOP):
                count["n"] += 1
            return real[name](self, *a, **k)

        return call

    for name in SYNCS:
        setattr(torch.Tensor, name, counted(name))
    try:
        tic = time.perf_counter()
        train_loop(lc, Dist(), out, model, opt, hooks, {"step": 0, "micro_step": 0, "epoch": 0})
        seconds = time.perf_counter() - tic
    finally:
        for name in SYNCS:
            setattr(torch.Tensor, name, real[name])
    return steps * batch / seconds, count["n"] / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        skip = run(args.preset, args.steps, args.batch, True, Path(tmp) / "a")
        check = run(args.preset, args.steps, args.batch, False, Path(tmp) / "b")
    print(f"{args.preset}, batch {args.batch}, {args.steps} steps, CPU, one log line at the end:")
    print(f"  device skip (fused AdamW): {skip[0]:8.1f} samples/s, {skip[1]:.2f} host syncs/step")
    print(f"  per-step check (AdamW):    {check[0]:8.1f} samples/s, {check[1]:.2f} host syncs/step")
    print(f"  ratio {skip[0] / check[0]:.2f}")


if __name__ == "__main__":
    main()
