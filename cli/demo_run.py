"""`flatdino demo`: every stage on the built-in digits, offline on a CPU, ending in a report.

The demo is a driver over the stage functions (the same ones the commands call), each with one
config. Its state lives in OUT/demo-state.json: finished stages are skipped on a re-run, an
interrupted stage is re-entered and resumes from its own checkpoints (stores skip finished shards,
trainers continue from RUN/checkpoints), so Ctrl-C and re-run continues where it stopped.

The class accuracy of the generated digits is judged by a classifier that never sees anything the
pipeline produced: scikit-learn's logistic regression on the real digits' 8×8 pixels (train split).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..pipeline.errors import InputError
from ..pipeline.store import write_atomic

STATE = "demo-state.json"


@dataclass(frozen=True)
class DemoConfig:
    """Everything `demo` needs; the defaults fit the whole run in under 10 minutes on 2 CPU cores."""

    out: str = "demo-out"
    fresh: bool = False  # delete OUT (a demo folder only) and start over
    vae_steps: int = 600
    dit_steps: int = 2000
    decoder_steps: int = 300
    per_class: int = 32  # generated samples per class (the grid shows up to 16 of them)
    sample_steps: int = 50  # Euler steps of the sampler
    cfg: float = 4.5  # classifier-free guidance weight
    watch_points: int = 8  # train-dit logs a grid and FD-DINOv2 this many times over its run
    backend: str = "local"  # extract-features / encode-latents backend: local | ray
    device: str = "auto"
    progress: bool = True

    def recipe(self) -> dict:
        """The settings that decide the outputs: a re-run with other values needs --fresh."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("out", "fresh", "backend", "device", "progress")
        }


@dataclass
class Stage:
    name: str
    what: str  # one line for the progress header
    run: Callable[[], dict]  # returns {"items": N, "unit": "images", ...extra results}


# ---------------------------------------------------------------- the independent digit judge


def _to_8x8(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, 64) in [0, 1]: grey, box-averaged to the digits' 8×8 grid."""
    from PIL import Image

    small = [
        np.asarray(Image.fromarray(im).convert("L").resize((8, 8), Image.BOX)) for im in images
    ]
    return np.stack(small).reshape(len(images), 64).astype(np.float64) / 255.0


def digit_judge():
    """Logistic regression on the real train-split digits (8×8, scaled to [0, 1]), and its accuracy
    on the real val split: the judge knows digits, not anything the pipeline made."""
    from sklearn.linear_model import LogisticRegression

    from ..pipeline.sources import digits_split

    (x_train, y_train), (x_val, y_val) = digits_split("train"), digits_split("val")
    clf = LogisticRegression(max_iter=5000).fit(x_train / 16.0, y_train)
    return clf, float((clf.predict(x_val / 16.0) == y_val).mean())


def judge(clf, images: np.ndarray, labels: np.ndarray) -> dict:
    """Class accuracy of uint8 images against the labels they were generated for."""
    pred = clf.predict(_to_8x8(images))
    classes = np.unique(labels)
    per_class = {str(c): float((pred[labels == c] == c).mean()) for c in classes}
    return {
        "accuracy": float((pred == labels).mean()),
        "n": int(len(labels)),
        "per_class": per_class,
    }


# ---------------------------------------------------------------- stages


class Demo:
    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.p = lambda name: str(self.out / name)

    def stages(self) -> list[Stage]:
        c = self.cfg
        return [
            Stage(
                "extract-train",
                "DINOv2-structured tiny backbone on 1,438 train digits, 2 views",
                lambda: self._extract("train"),
            ),
            Stage("extract-val", "the same on 359 val digits", lambda: self._extract("val")),
            Stage("train-vae", f"tiny FlatDINO VAE, {c.vae_steps} steps", self._train_vae),
            Stage("encode-train", "train features -> latents", lambda: self._encode("train")),
            Stage("encode-val", "val features -> latents", lambda: self._encode("val")),
            Stage(
                "train-decoder", f"tiny pixel decoder, {c.decoder_steps} steps", self._train_decoder
            ),
            Stage(
                "train-dit",
                f"tiny LightningDiT on the latents, {c.dit_steps} steps, "
                f"FD-DINOv2 and a grid {c.watch_points} times",
                self._train_dit,
            ),
            Stage(
                "sample",
                f"{c.per_class} digits per class, {c.sample_steps} Euler steps, CFG {c.cfg}",
                self._sample,
            ),
            Stage(
                "guidance",
                "sweep-cfg; Heun vs Euler at 10 and 50 steps; AutoGuidance",
                self._guidance,
            ),
            Stage(
                "evaluate",
                "VAE error, k-NN, FD, token ablation, generated-digit accuracy",
                self._evaluate,
            ),
        ]

    # Each stage is the same function its command calls, with the demo's small settings.

    def _extract(self, split: str) -> dict:
        from ..pipeline.extract import ExtractConfig, extract_features

        s = extract_features(
            ExtractConfig(
                data="digits",
                out=self.p(f"features-{split}.zarr"),
                split=split,
                backbone="tiny",
                views=2,
                backend=self.cfg.backend,
                device=self.cfg.device,
                progress=self.cfg.progress,
            )
        )
        return {"items": s.images, "unit": "images"}

    def _train_vae(self) -> dict:
        from ..trainers.train_vae import TrainVAEConfig, train_vae

        batch = 32
        train_vae(
            TrainVAEConfig(
                features=self.p("features-train.zarr"),
                val_features=self.p("features-val.zarr"),
                out=self.p("runs/vae"),
                preset="tiny",
                steps=self.cfg.vae_steps,
                batch_size=batch,
                lr=1e-3,
                num_workers=0,
                log_every=50,
                eval_every=10**9,
                ckpt_every=100,
                device=self.cfg.device,
                resume=True,
                progress=self.cfg.progress,
            )
        )
        return {"items": self.cfg.vae_steps * batch, "unit": "samples"}

    def _encode(self, split: str) -> dict:
        from ..pipeline.encode import EncodeConfig, encode_latents

        s = encode_latents(
            EncodeConfig(
                features=self.p(f"features-{split}.zarr"),
                vae=self.p("runs/vae"),
                out=self.p(f"latents-{split}.zarr"),
                backend=self.cfg.backend,
                device=self.cfg.device,
                progress=self.cfg.progress,
            )
        )
        return {"items": s["images"], "unit": "images"}

    def _train_dit(self) -> dict:
        from ..trainers.train_dit import TrainDiTConfig, train_dit

        batch = 64
        train_dit(
            TrainDiTConfig(
                latents=self.p("latents-train.zarr"),
                out=self.p("runs/dit"),
                preset="tiny",
                steps=self.cfg.dit_steps,
                batch_size=batch,
                lr=1e-3,
                ema_decay=0.995,
                normalize=True,
                # View 1 is the horizontal flip: fine for ImageNet, but a mirrored 5 is no 5. Trained
                # on both views, 79–83% of the generated digits were recognised (5, 6 the worst);
                # on view 0 alone, 100%. The VAE still learns from both views.
                views=1,
                log_every=200,
                ckpt_every=500,
                device=self.cfg.device,
                resume=True,
                progress=self.cfg.progress,
                # watched: EMA samples through the pixel decoder and their FD against the val features
                sample_every=self._every(),
                fd_samples=10 * self.cfg.per_class,
                sample_steps=20,
                fd_features=self.p("features-val.zarr"),
                decoder=self.p("runs/decoder"),
                keep_every=self._guide_step(),  # steps/ keeps the weak model of AutoGuidance
            )
        )
        return {"items": self.cfg.dit_steps * batch, "unit": "samples"}

    def _every(self) -> int:
        return max(1, self.cfg.dit_steps // self.cfg.watch_points)

    def _guide_step(self) -> int:
        """The early checkpoint AutoGuidance guides with: a quarter of the way."""
        return max(1, self.cfg.dit_steps // 4)

    def _train_decoder(self) -> dict:
        from ..trainers.train_decoder import TrainDecoderConfig, train_decoder

        batch = 32
        train_decoder(
            TrainDecoderConfig(
                features=self.p("features-train.zarr"),
                out=self.p("runs/decoder"),
                preset="tiny",
                steps=self.cfg.decoder_steps,
                batch_size=batch,
                lr=1e-3,
                noise_tau=0.0,
                num_workers=0,
                log_every=50,
                ckpt_every=100,
                device=self.cfg.device,
                resume=True,
                progress=self.cfg.progress,
            )
        )
        return {"items": self.cfg.decoder_steps * batch, "unit": "samples"}

    def _sample(self) -> dict:
        samples = self._sample_into("samples", cfg=self.cfg.cfg, save_features=True)
        return {"items": len(samples["labels"]), "unit": "samples"}

    def _sample_into(self, folder: str, cfg: float, save_features: bool, **options):
        """`flatdino sample` of every class into OUT/folder; returns its samples.npz."""
        from ..sampling.sample import SampleConfig, sample

        settings = {"steps": self.cfg.sample_steps, **options}
        sample(
            SampleConfig(
                dit=self.p("runs/dit"),
                out=self.p(folder),
                decoder=self.p("runs/decoder"),
                classes="all",
                per_class=self.cfg.per_class,
                cfg=cfg,
                save_features=save_features,
                device=self.cfg.device,
                progress=self.cfg.progress,
                **settings,
            )
        )
        return np.load(self.p(f"{folder}/samples.npz"))

    def _guidance(self) -> dict:
        """The guidance sweep (paper Fig. 14), Heun against Euler, and AutoGuidance with the
        quarter-way checkpoint as the weak model: digit accuracy and FD-DINOv2 against val."""
        from ..eval.fid import FidConfig, frechet_distance, load_set
        from ..eval.sweep import SweepConfig, sweep_cfg

        p, c = self.p, self.cfg
        sweep = sweep_cfg(
            SweepConfig(
                dit=p("runs/dit"),
                features=p("features-val.zarr"),
                out=p("sweep"),
                scales=(1.0, 2.0, 4.5, 6.0),
                interval_starts=(0.0, 0.225, 0.5),
                n=10 * c.per_class,
                steps=max(1, c.sample_steps // 2),
                device=c.device,
                progress=c.progress,
            )
        )
        clf, _ = digit_judge()
        space = FidConfig(real="", space="dinov2", progress=False)
        val = load_set(p("features-val.zarr"), space).stats

        def measured(folder: str, samples) -> dict:
            fd = frechet_distance(load_set(p(f"{folder}/features.npy"), space).stats, val)
            return {
                "accuracy": judge(clf, samples["arr_0"], samples["labels"])["accuracy"],
                "fd_dinov2": fd,
            }

        samplers = []
        for sampler, steps in [("euler", 10), ("heun", 10), ("euler", 50), ("heun", 50)]:
            folder = f"samplers/{sampler}-{steps}"
            if sampler == "euler" and steps == c.sample_steps:
                folder, samples = "samples", np.load(p("samples/samples.npz"))  # made already
            else:
                samples = self._sample_into(folder, c.cfg, True, sampler=sampler, steps=steps)
            samplers.append({"sampler": sampler, "steps": steps, **measured(folder, samples)})
        guide = p(f"runs/dit/steps/{self._guide_step():07d}")
        auto = self._sample_into("samples-autoguidance", 2.0, True, guide_dit=guide)
        return {
            "items": 0,
            "unit": "",
            "sweep": {
                "best": sweep["best"],
                "heatmap": "sweep/heatmap.png",
                "csv": "sweep/sweep.csv",
            },
            "samplers": samplers,
            "autoguidance": {
                "guide_step": self._guide_step(),
                "weight": 2.0,
                **measured("samples-autoguidance", auto),
            },
        }

    def _evaluate(self) -> dict:
        import torch

        from ..eval.ablate import ablate, plot_ablation
        from ..eval.fid import FidConfig, frechet_distance, load_set, reconstructions
        from ..eval.knn import knn_eval
        from ..pipeline.checkpoints import load_vae, resolve_vae
        from ..trainers.runner import Dist
        from ..trainers.train_vae import evaluate

        p = self.p
        vae = load_vae(resolve_vae(p("runs/vae")))[0]
        with torch.no_grad():
            vae_err = evaluate(vae, p("features-val.zarr"), Dist(), batch=64)
        knn = knn_eval(
            [
                (p("features-train.zarr"), p("features-val.zarr")),
                (p("latents-train.zarr"), p("latents-val.zarr")),
            ]
        )
        space = FidConfig(real="", space="dinov2", progress=False)
        stats = {
            k: load_set(path, space).stats
            for k, path in [
                ("train", p("features-train.zarr")),
                ("val", p("features-val.zarr")),
                ("generated", p("samples/features.npy")),
            ]
        }
        fd = {
            "generated_vs_val": frechet_distance(stats["generated"], stats["val"]),
            "train_vs_val": frechet_distance(stats["train"], stats["val"]),
        }
        heat = ablate(p("features-val.zarr"), p("runs/vae"), images=128)
        plot_ablation(heat, p("ablation.png"))

        clf, real_val = digit_judge()
        samples = np.load(p("samples/samples.npz"))
        generated = judge(clf, samples["arr_0"], samples["labels"])
        # The same noise without guidance: how much of the accuracy CFG buys (one pass per step).
        unguided = self._sample_into("samples-cfg1", cfg=1.0, save_features=False)
        unguided_acc = judge(clf, unguided["arr_0"], unguided["labels"])["accuracy"]
        rec = reconstructions(
            p("features-val.zarr"), p("runs/vae"), p("runs/decoder"), images=10**9
        )
        labels = np.asarray(load_store_labels(p("features-val.zarr")))[: len(rec["images"])]
        ceilings = {k: judge(clf, v, labels)["accuracy"] for k, v in rec.items()}
        return {
            "items": 0,
            "unit": "",
            "vae_val": vae_err,
            "knn": [
                {
                    "space": r["kind"].rsplit(".", 1)[-1],
                    "dim": r["dim"],
                    "top1": r["top1"],
                    "top5": r["top5"],
                }
                for r in knn
            ],
            "fd_dinov2_space": fd,
            "ablation_png": "ablation.png",
            "generated": {
                **generated,
                "accuracy_without_cfg": unguided_acc,
                "judge_on_real_val_8x8": real_val,
                "judge_on_val_crops": ceilings["images"],
                "judge_on_val_decoder": ceilings["decoder"],
                "judge_on_val_vae_decoder": ceilings["vae_decoder"],
            },
        }


def load_store_labels(path: str) -> np.ndarray:
    """Labels of a store's valid rows, in row order (the order `reconstructions` reads them)."""
    from ..pipeline.feature_store import FeatureStore

    store = FeatureStore(path)
    return np.asarray(store.group["labels"][:])[store.valid_rows()]


# ---------------------------------------------------------------- driver and report


def _prepare(cfg: DemoConfig) -> dict:
    """Open or start OUT/demo-state.json; --fresh deletes OUT, but only a demo's own folder."""
    out = Path(cfg.out)
    state_path = out / STATE
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {cfg.out!r} is a file; pass a folder for the demo")
    if out.exists() and not state_path.exists() and any(out.iterdir()):
        raise InputError(
            f"{cfg.out!r} exists and is not a demo folder (no {STATE}); delete it or pass an "
            "empty or new --out"
        )
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not state_path.exists():
        state = {"recipe": cfg.recipe(), "stages": {}}
        _save_state(out, state)  # before any stage writes: a kill leaves a folder --fresh accepts
        return state
    try:
        state = json.loads(state_path.read_text())
        recipe = state["recipe"]
        if not isinstance(state["stages"], dict):
            raise TypeError("'stages' is not a mapping")
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(
            f"{str(state_path)!r} is unreadable ({e}); pass --fresh to start over"
        ) from e
    if recipe != cfg.recipe():
        changed = sorted(k for k, v in cfg.recipe().items() if recipe.get(k) != v)
        raise InputError(
            f"{cfg.out!r} was made with other demo settings ({', '.join(changed)}); pass --fresh "
            "to start over, or another --out"
        )
    return state


def _save_state(out: Path, state: dict) -> None:
    write_atomic(out / STATE, json.dumps(state, indent=2).encode())


def run_stages(cfg: DemoConfig, stages: list[Stage], echo: Callable[[str], None] = print) -> dict:
    """Run the stages not yet done in OUT/demo-state.json, recording each one's time and result."""
    out = Path(cfg.out)
    state = _prepare(cfg)
    for i, stage in enumerate(stages, 1):
        rec = state["stages"].setdefault(stage.name, {"done": False, "seconds": 0.0, "attempts": 0})
        if rec["done"]:
            echo(
                f"[{i}/{len(stages)}] {stage.name}: done in an earlier run ({rec['seconds']:.0f}s); skipped"
            )
            continue
        echo(f"[{i}/{len(stages)}] {stage.name}: {stage.what}")
        rec["attempts"] = rec.get("attempts", 0) + 1
        start = time.perf_counter()
        try:
            result = stage.run()
        finally:  # an interrupted stage keeps the time it spent; its re-run adds to it
            rec["seconds"] += time.perf_counter() - start
            _save_state(out, state)
        rec.update(result, done=True)
        _save_state(out, state)
        rate = f", {rec['items'] / rec['seconds']:.1f} {rec['unit']}/s" if rec.get("items") else ""
        echo(f"[{i}/{len(stages)}] {stage.name}: done in {rec['seconds']:.1f}s{rate}")
    return state


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = print) -> dict:
    """Run (or finish) every stage, then write OUT/report.json and OUT/report.md; returns the report."""
    state = run_stages(cfg, Demo(cfg).stages(), echo)
    report = build_report(cfg, state)
    out = Path(cfg.out)
    write_atomic(out / "report.json", json.dumps(report, indent=2).encode())
    write_atomic(out / "report.md", render_report(report).encode())
    return report


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
