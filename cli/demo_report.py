"""The demo's report: OUT/report.json from the recorded stages, and its Markdown rendering."""

from __future__ import annotations

import json
from pathlib import Path

from .demo_stages import DemoConfig


def build_report(cfg: DemoConfig, state: dict) -> dict:
    stages = {}
    for name, rec in state["stages"].items():
        row = {"seconds": round(rec["seconds"], 1), "attempts": rec.get("attempts", 1)}
        if rec.get("items"):
            row.update(
                items=rec["items"],
                unit=rec["unit"],
                per_second=round(rec["items"] / max(rec["seconds"], 1e-9), 1),
            )
        stages[name] = row
    ev = state["stages"]["evaluate"]
    fd_curve = []
    metrics = Path(cfg.out) / "runs" / "dit" / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        fd_curve = [[r["step"], r["fd_dinov2"]] for r in rows if "fd_dinov2" in r]
    guidance = state["stages"].get("guidance", {})
    return {
        "settings": cfg.recipe(),
        "stages": stages,
        "total_seconds": round(sum(r["seconds"] for r in state["stages"].values()), 1),
        "vae_val_rel_err": ev["vae_val"]["val_rel_err"],
        "knn": ev["knn"],
        "fd_dinov2_space": ev["fd_dinov2_space"],
        "generated": ev["generated"],
        "fd_during_training": fd_curve,
        "guidance_sweep": guidance.get("sweep"),
        "samplers": guidance.get("samplers"),
        "autoguidance": guidance.get("autoguidance"),
        "outputs": {
            "grid": "samples/grid.png",
            "ablation": "ablation.png",
            "samples": "samples/samples.npz",
            "runs": "runs/",
        },
    }


def render_report(r: dict) -> str:
    g = r["generated"]
    lines = [
        "# flatdino demo report",
        "",
        "Built-in digits (1,438 train / 359 val), tiny presets, run on this machine.",
        f"Total {r['total_seconds']:.0f} s. Sample grid: `samples/grid.png` (one row per class); "
        "token ablation: `ablation.png`.",
        "",
        "## Stages",
        "",
        "| stage | seconds | throughput |",
        "|---|---:|---|",
    ]
    for name, s in r["stages"].items():
        rate = (
            f"{s['per_second']:.1f} {s['unit']}/s ({s['items']} {s['unit']})"
            if "items" in s
            else ""
        )
        if s["attempts"] > 1:  # the time of every attempt, redone steps and start-ups included
            rate += f" (resumed: {s['attempts']} attempts)"
        lines.append(f"| {name} | {s['seconds']:.1f} | {rate} |")
    lines += [
        "",
        "## Results",
        "",
        f"- VAE validation relative reconstruction error ‖x̂−x‖/‖x‖: **{r['vae_val_rel_err']:.3f}**",
        "- k-NN (k=20, T=0.07) train → val, mean-pooled view 0:",
    ]
    for k in r["knn"]:
        lines.append(
            f"  - {k['space']} ({k['dim']}-d): top-1 {k['top1']:.1%}, top-5 {k['top5']:.1%}"
        )
    fd = r["fd_dinov2_space"]
    lines += [
        f"- Fréchet distance of mean-pooled backbone features: generated (the VAE decoder's "
        f"output) vs val **{fd['generated_vs_val']:.4f}** (train vs val, the floor: "
        f"{fd['train_vs_val']:.4f})",
        f"- **Generated digits recognised as the requested class: {g['accuracy']:.1%}** of {g['n']}",
        "  (judge: logistic regression on the real train digits' 8×8 pixels; samples are greyed and",
        f"  box-averaged to 8×8); the same noise without guidance (CFG 1): {g['accuracy_without_cfg']:.1%}",
        "  - per class: " + ", ".join(f"{c}: {v:.0%}" for c, v in g["per_class"].items()),
        f"  - the same judge on real val digits: {g['judge_on_real_val_8x8']:.1%}; on the val crops "
        f"at 256 px: {g['judge_on_val_crops']:.1%}; through the pixel decoder: "
        f"{g['judge_on_val_decoder']:.1%}; through VAE + decoder: {g['judge_on_val_vae_decoder']:.1%}",
        "",
    ]
    lines += _render_watching(r)
    return "\n".join(lines)


def _render_watching(r: dict) -> list[str]:
    lines = []
    if r.get("fd_during_training"):
        curve = ", ".join(f"{s}: {v:.3f}" for s, v in r["fd_during_training"])
        lines += [
            "## Watching the DiT train",
            "",
            f"FD-DINOv2 of the EMA samples against val, by step: {curve}. Grids: "
            "`runs/dit/grids/`; curves: `flatdino info runs/dit --plot`.",
            "",
        ]
    if r.get("guidance_sweep"):
        b = r["guidance_sweep"]["best"]
        lines += [
            "## Guidance",
            "",
            f"- `sweep-cfg` (`sweep/heatmap.png`, `sweep/sweep.csv`): the lowest "
            f"{b['metric']} {b['value']:.4f} is at CFG {b['cfg']:g} from t = "
            f"{b['interval_start']:g}.",
            "",
        ]
    if r.get("samplers"):
        lines += [
            "| sampler | steps | digits recognised | FD-DINOv2 vs val |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {s['sampler']} | {s['steps']} | {s['accuracy']:.1%} | {s['fd_dinov2']:.4f} |"
            for s in r["samplers"]
        ]
        lines.append("")
    if r.get("autoguidance"):
        a = r["autoguidance"]
        lines += [
            f"- AutoGuidance, guided by the step-{a['guide_step']} checkpoint at weight "
            f"{a['weight']:g}: {a['accuracy']:.1%} recognised, FD-DINOv2 {a['fd_dinov2']:.4f}.",
            "",
        ]
    return lines
