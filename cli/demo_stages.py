"""The stages of `flatdino demo`: each is the function its command calls, with one small config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..models.configs import CFG_INTERVAL


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

    def _train_dit(self, run: str = "runs/dit", preset: str = "tiny", **changes) -> dict:
        """The demo's generator; bench/generators.py trains others with the same settings,
        changing only `run`, `preset` and the options in `changes`."""
        from ..trainers.train_dit import TrainDiTConfig, train_dit

        batch = 64
        options = dict(
            latents=self.p("latents-train.zarr"),
            out=self.p(run),
            preset=preset,
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
        train_dit(TrainDiTConfig(**{**options, **changes}))
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

    def _sample_into(
        self, folder: str, cfg: float, save_features: bool, dit: str = "runs/dit", **options
    ):
        """`flatdino sample` of every class from OUT/dit into OUT/folder; returns its samples.npz."""
        from ..sampling.sample import SampleConfig, sample

        settings = {"steps": self.cfg.sample_steps, **options}
        sample(
            SampleConfig(
                dit=self.p(dit),
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
        from ..eval.judge import digit_judge, judge
        from ..eval.sweep import SweepConfig, sweep_cfg

        p, c = self.p, self.cfg
        sweep = sweep_cfg(
            SweepConfig(
                dit=p("runs/dit"),
                features=p("features-val.zarr"),
                out=p("sweep"),
                scales=(1.0, 2.0, 4.5, 6.0),
                interval_starts=(0.0, CFG_INTERVAL[0], 0.5),
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
        from ..eval.fid import FidConfig, frechet_distance, load_set
        from ..eval.judge import digit_judge, judge
        from ..eval.knn import knn_eval
        from ..eval.rfid import reconstructions
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
    return store.labels()[store.valid_rows()]
