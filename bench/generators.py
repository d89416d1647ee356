"""The generator kinds side by side: what each learns on the digits demo, and what a step costs.

1. Learning. The demo's chain up to the pixel decoder (`flatdino demo`'s own stages, kept in OUT
   and reused by a re-run), then each generator trained with the demo's train-dit settings (its
   steps, batch 64, lr 1e-3, EMA 0.995, view 0, seed 0; no watch samples) and sampled as the demo
   samples (32 per class, 50 Euler steps, CFG 4.5 on the demo's interval, the same noise):
     - LightningDiT `tiny`, the demo's generator;
     - DiT-DH `dit-dh-tiny` (a 64-wide encoder of 2 blocks, one 96-wide head block);
     - with --cls: LightningDiT `tiny` trained with `--cls`, when train-dit has it.
   Each is judged by the demo's digit classifier (generated-digit accuracy) and by FD-DINOv2 of
   its samples against the val features; training seconds are the stage's own.
2. Cost. One training step (forward + backward of the flow loss) of dit-xl and dit-dh-xl on
   (B, 32, 128) latents, fp32 on this machine's CPU, per sample, next to the forward FLOPs of both
   counted on the meta device and Table 7's 14.3 and 17.5 GFLOPs.

    python bench/generators.py [--out bench-generators] [--steps 2000] [--cls]
                               [--cost-batch 4] [--repeats 2] [--skip-learning] [--skip-cost]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flatdino.cli.demo_run import run_stages
from flatdino.cli.demo_stages import Demo, DemoConfig, Stage
from flatdino.eval.fid import FidConfig, frechet_distance, load_set
from flatdino.eval.flops import count_forward_flops
from flatdino.eval.judge import digit_judge, judge
from flatdino.models.dit_dh import build_generator, generator_preset
from flatdino.models.flow import flow_loss

CHAIN = ("extract-train", "extract-val", "train-vae", "encode-train", "encode-val", "train-decoder")
PAPER_GFLOPS = {"dit-xl": 14.3, "dit-dh-xl": 17.5}  # Table 7, FlatDINO's 32 x 128 latents


def generators(with_cls: bool) -> dict[str, tuple[str, dict]]:
    """name -> (train-dit preset, the options changed from the demo's train-dit)."""
    kinds = {"LightningDiT tiny": ("tiny", {}), "DiT-DH dit-dh-tiny": ("dit-dh-tiny", {})}
    if with_cls:
        kinds["LightningDiT tiny --cls"] = ("tiny", {"cls": True})
    return kinds


def learning(out: Path, steps: int, with_cls: bool) -> list[dict]:
    cfg = DemoConfig(out=str(out), dit_steps=steps, progress=False)
    demo = Demo(cfg)
    chain = [s for s in demo.stages() if s.name in CHAIN]
    runs = {
        name: f"runs/{preset}{'-cls' if o else ''}"
        for name, (preset, o) in generators(with_cls).items()
    }

    def train(name: str) -> dict:
        preset, changes = generators(with_cls)[name]
        return demo._train_dit(runs[name], preset, sample_every=0, **changes)

    stages = [Stage(f"train {n}", n, lambda n=n: train(n)) for n in runs]
    state = run_stages(cfg, chain + stages)
    clf, _ = digit_judge()
    space = FidConfig(real="", space="dinov2", progress=False)
    val = load_set(str(out / "features-val.zarr"), space).stats
    rows = []
    for name, run in runs.items():
        folder = f"samples-{Path(run).name}"
        samples = demo._sample_into(folder, cfg.cfg, True, dit=run)
        fd = frechet_distance(load_set(str(out / folder / "features.npy"), space).stats, val)
        rows.append(
            {
                "generator": name,
                "train_seconds": state["stages"][f"train {name}"]["seconds"],
                "accuracy": judge(clf, samples["arr_0"], samples["labels"])["accuracy"],
                "fd_dinov2": fd,
            }
        )
    return rows


def step_cost(preset: str, batch: int, repeats: int) -> dict:
    """Seconds per sample of forward + backward on (batch, 32, 128), and forward GFLOPs."""
    torch.manual_seed(0)
    cfg = generator_preset(preset, tokens=32, latent_dim=128)
    with torch.device("meta"):
        x, t, y = torch.empty(1, 32, 128), torch.empty(1), torch.zeros(1, dtype=torch.long)
        flops = count_forward_flops(build_generator(cfg), x, t, y)
    model = build_generator(cfg)
    x1, y = torch.randn(batch, 32, 128), torch.randint(0, 1000, (batch,))

    def step() -> None:
        flow_loss(model, x1, y, kappa=3.0).backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        step()
        times.append(time.perf_counter() - tic)
    params = sum(p.numel() for p in model.parameters())
    return {
        "preset": preset,
        "params": params,
        "gflops": flops / 1e9,
        "s_per_sample": sorted(times)[len(times) // 2] / batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench-generators"))
    parser.add_argument("--steps", type=int, default=DemoConfig.dit_steps, help="train-dit steps")
    parser.add_argument("--cls", action="store_true", help="also a LightningDiT with --cls")
    parser.add_argument("--cost-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-learning", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args()
    report: dict = {"torch_threads": torch.get_num_threads()}
    if not args.skip_learning:
        rows = report["learning"] = learning(args.out, args.steps, args.cls)
        print(f"\n{'generator':28s} {'train s':>8s} {'accuracy':>9s} {'FD-DINOv2':>10s}")
        for r in rows:
            print(
                f"{r['generator']:28s} {r['train_seconds']:8.0f} {r['accuracy']:9.3f} "
                f"{r['fd_dinov2']:10.4f}"
            )
    if not args.skip_cost:
        rows = report["cost"] = [step_cost(p, args.cost_batch, args.repeats) for p in PAPER_GFLOPS]
        base = rows[0]
        print(
            f"\n{'preset':10s} {'params':>13s} {'GFLOPs':>7s} {'paper':>6s} {'s/sample':>9s} "
            f"{'time ratio':>10s} {'FLOP ratio':>10s}"
        )
        for r in rows:
            print(
                f"{r['preset']:10s} {r['params']:13,} {r['gflops']:7.2f} "
                f"{PAPER_GFLOPS[r['preset']]:6.1f} {r['s_per_sample']:9.3f} "
                f"{r['s_per_sample'] / base['s_per_sample']:10.2f} "
                f"{r['gflops'] / base['gflops']:10.2f}"
            )
        print(
            f"paper's FLOP ratio: {PAPER_GFLOPS['dit-dh-xl'] / PAPER_GFLOPS['dit-xl']:.2f}; "
            f"fp32, batch {args.cost_batch}, torch threads {report['torch_threads']}"
        )
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()
