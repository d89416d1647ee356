"""`flatdino train-dit`: flow matching of a generator (LightningDiT or DiT-DH) on cached latents
(single process or torchrun).

Neither DINOv2 nor the FlatDINO encoder runs here: the latents store from `encode-latents` is read
into memory once and the loop (trainers/loop.py, shared with train-vae) only runs the DiT.

A checkpoint folder holds model.safetensors (raw weights), ema.safetensors (the fp32 EMA the
sampler uses by default), latent_stats.safetensors (the normalisation to undo after sampling),
config.json (the DiTConfig, or a DiTDHConfig whose `kind` says so) and flow.json (κ, time
distribution, the latents store and the VAE it came from), so `flatdino sample` never needs an
option typed again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from ..models.dit import DiTConfig
from ..models.dit_dh import GENERATOR_PRESETS, DiTDHConfig, build_generator, generator_preset
from ..models.flow import LatentNorm, State, batch_size, flow_loss, smap
from ..pipeline.checkpoints import (
    FlowRecord,
    load_pixel_decoder,
    load_vae,
    read_flow,
    resolve_vae,
    rewrite,
)
from ..pipeline.env import inference_dtype
from ..pipeline.errors import FlatDinoError
from ..pipeline.frechet import RunningStats, frechet_distance, store_statistics
from ..pipeline.generate import Generator, Guidance, generate, start_noise
from ..pipeline.latent_store import LatentStore
from ..pipeline.loader import LatentBatches, LoaderConfig
from .configs import TrainDiTConfig
from .loop import LoopHooks
from .optim import WSDSchedule
from .pictures import FeaturePCA, tile, to_uint8
from .run import start_run
from .runner import Dist, setup_distributed

log = logging.getLogger("flatdino.train")


def build_model_config(cfg: TrainDiTConfig, store: LatentStore) -> DiTConfig | DiTDHConfig:
    """The preset with T, d, the class count and (--cls) the CLS width C taken from the store."""
    if cfg.preset not in GENERATOR_PRESETS:
        raise FlatDinoError(
            f"--preset must be one of {sorted(GENERATOR_PRESETS)}; got {cfg.preset!r}"
        )
    t, d = store.token_shape
    cls_dim = 0
    if cfg.cls:
        store.require_cls("--latents")
        cls_dim = int(store.array("cls").shape[2])  # (N, V, C)
    return generator_preset(
        cfg.preset, tokens=t, latent_dim=d, num_classes=store.num_classes(), cls_dim=cls_dim
    )


def flow_record(cfg: TrainDiTConfig, store: LatentStore) -> FlowRecord:
    """flow.json: how the model was trained and on what, for the sampler and for resume checks."""
    attrs = store.attrs
    return FlowRecord(
        kappa=cfg.kappa,
        time_dist=cfg.time_dist,
        class_dropout=cfg.class_dropout,
        normalize=cfg.normalize,
        views=store.train_views(cfg.views),
        latents=store.location.identity(),
        latents_fingerprint=attrs.get("fingerprint"),
        vae_checkpoint=attrs.get("vae_checkpoint"),
        class_names=attrs.get("class_names"),
    )


def latent_norm(
    cfg: TrainDiTConfig, store: LatentStore, model_cfg: DiTConfig | DiTDHConfig
) -> LatentNorm:
    if not cfg.normalize:
        return LatentNorm.identity(model_cfg.tokens, model_cfg.latent_dim)
    mean, std = store.stats()
    return LatentNorm(torch.from_numpy(mean), torch.from_numpy(std))


def _check_resume(out: Path, flow: FlowRecord) -> None:
    """Refuse to continue a run on another latents store (other VAE or other features)."""
    saved = out / "checkpoints" / "flow.json"
    if saved.exists():
        old = read_flow(saved, rewrite("train-dit"))
        names = ("latents_fingerprint", "normalize", "kappa", "time_dist", "views")
        key = old.first_difference(flow, names)  # runs from before --views have no views
        if key is not None:
            raise FlatDinoError(
                f"run {str(out)!r} was trained with {key} = {getattr(old, key)!r}, this "
                f"invocation has {getattr(flow, key)!r}; resume with the same --latents and flow "
                "options"
            )


def _schedule(
    cfg: TrainDiTConfig, loader: LatentBatches, accum: int, d: Dist
) -> tuple[int, WSDSchedule]:
    """(optimiser steps per epoch, the LR schedule): constant after an optional linear warmup."""
    steps_per_epoch = loader.steps_per_epoch() // accum
    if steps_per_epoch < 1:
        raise FlatDinoError(
            f"--batch-size {cfg.run.batch_size} is larger than the {len(loader.latents) * d.world} "
            f"valid images of --latents {cfg.latents!r}; choose a smaller --batch-size"
        )
    total = cfg.run.steps if cfg.run.steps is not None else cfg.run.epochs * steps_per_epoch
    warmup = min(cfg.warmup_steps, total)
    return steps_per_epoch, WSDSchedule(peak=cfg.run.lr, warmup=warmup, stable=total - warmup)


class SampleMonitor:
    """Rank 0's view of training: from the EMA weights, `fd_samples` class-balanced samples and a
    grid of 8 classes x 8, both from fixed noise and labels (so two steps compare), decoded by the
    VAE the latents came from. FD-DINOv2 of the mean-pooled decoded features against the reference
    store (its statistics computed once); the grid in pixels through --decoder, else in the PCA
    colours of the reference features."""

    def __init__(
        self,
        cfg: TrainDiTConfig,
        store: LatentStore,
        model_cfg: DiTConfig | DiTDHConfig,
        norm: LatentNorm,
        flow: FlowRecord,
        d: Dist,
    ):
        vae_path = store.attrs.get("vae_checkpoint")
        reference = cfg.fd_features or (store.attrs.get("config") or {}).get("features")
        fix = "pass --sample-every 0 to train without samples"
        if not vae_path or not Path(vae_path).exists():
            raise FlatDinoError(
                f"--sample-every needs the VAE the latents came from, {vae_path!r}, "
                f"which is not there; {fix}"
            )
        if not reference or not Path(reference).exists():
            raise FlatDinoError(
                f"--sample-every needs a reference feature store for FD, "
                f"{reference!r} is not there; pass --fd-features or {fix}"
            )
        vae = load_vae(resolve_vae(vae_path))[0].to(d.device)
        decoder = load_pixel_decoder(cfg.decoder)[0].to(d.device) if cfg.decoder else None
        self.reference, first = store_statistics(reference, cfg.fd_reference)  # RunningStats
        self.pca = FeaturePCA(first[:64])
        self.device = d.device
        self.dtype = inference_dtype(cfg.run.precision, d.device)  # the networks', as training
        # the DiT is the EMA module of each call; guided with the full interval
        self.gen = Generator(None, norm, vae, float(flow.kappa), decoder)
        self.guidance = Guidance(cfg.sample_steps, cfg.sample_cfg, (0.0, 1.0))
        k = model_cfg.num_classes
        self.labels = np.resize(np.arange(k), cfg.fd_samples)
        self.noise = start_noise(cfg.run.seed, range(cfg.fd_samples), model_cfg)
        self.grid_labels = np.repeat(np.arange(min(k, 8)), 8)
        self.grid_noise = start_noise(cfg.run.seed + 1, range(len(self.grid_labels)), model_cfg)

    @torch.no_grad()
    def generate(self, model, noise: State, labels: np.ndarray, pixels: bool, batch=256):
        """The chain of `flatdino sample` in batches of `batch`, from `model`'s weights."""
        gen = dataclasses.replace(self.gen, dit=model)
        for i in range(0, batch_size(noise), batch):
            x0 = smap(lambda a, i=i: a[i : i + batch].to(self.device), noise)
            y = torch.from_numpy(labels[i : i + batch]).to(self.device)
            yield generate(gen, x0, y, self.guidance, self.dtype, pixels)

    def __call__(self, model, run) -> dict:
        tic = time.perf_counter()
        was_training = model.training
        model.eval()
        acc = RunningStats(len(self.reference.sum))
        for out in self.generate(model, self.noise, self.labels, pixels=False):
            acc.add(out.features.mean(1).double().cpu().numpy())
        (grid,) = self.generate(model, self.grid_noise, self.grid_labels, pixels=True)
        model.train(was_training)
        if grid.pixels is not None:  # 64 thumbnails of 128 px: a grid of ~1 MP
            pictures = to_uint8(F.interpolate(grid.pixels, size=128, mode="area"))
        else:
            pictures = self.pca(grid.features.cpu().numpy())
        run.image("samples", tile(pictures, cols=8))
        fd = frechet_distance(acc.result(), self.reference.result())
        return {"fd_dinov2": fd, "sample_seconds": time.perf_counter() - tic}


def train_dit(cfg: TrainDiTConfig) -> dict:
    """Train (or resume) a DiT on a latents store as `cfg` says; returns the final metrics."""
    d = setup_distributed(cfg.run.device, cfg.run.dist_timeout)
    store = LatentStore.open_complete(cfg.latents, "--latents")
    model_cfg = build_model_config(cfg, store)
    if cfg.run.steps is None and cfg.run.epochs is None:
        raise FlatDinoError("give the run length with --steps N or --epochs E")
    if cfg.time_dist not in ("uniform", "logit-normal"):
        raise FlatDinoError(f"--time-dist must be uniform or logit-normal; got {cfg.time_dist!r}")
    flow = flow_record(cfg, store)
    if cfg.run.resume:
        _check_resume(Path(cfg.out), flow)
    with start_run(cfg, model_cfg.to_dict(), d) as run:
        loader = LatentBatches(
            store,
            LoaderConfig(run.micro, cfg.run.seed, 0, 0, d.rank, d.world),
            progress=cfg.run.progress and d.main,
            views=flow.views,
            cls=cfg.cls,
        )
        steps_per_epoch, schedule = _schedule(cfg, loader, run.accum, d)
        norm = latent_norm(cfg, store, model_cfg).to(d.device)
        ema: ModelEmaV3 | None = None

        def with_ema(model: torch.nn.Module) -> dict:
            """The fp32 EMA of the weights, resumed with them and saved as ema.safetensors."""
            nonlocal ema
            ema = ModelEmaV3(model, decay=cfg.ema_decay, dtype=torch.float32)
            return {"ema": ema.module}

        model = run.build(lambda: build_generator(model_cfg), {"best_fd": float("inf")}, with_ema)
        run.extra_weights["latent_stats"] = norm
        run.extra_json["flow"] = flow.to_json()
        log.info(
            "model %s: %.2fM parameters, T=%d d=%d, %d classes, %d steps (%d/epoch), accum %d",
            cfg.preset,
            sum(p.numel() for p in model.parameters()) / 1e6,
            model_cfg.tokens,
            model_cfg.latent_dim,
            model_cfg.num_classes,
            schedule.total,
            steps_per_epoch,
            run.accum,
        )

        def loss(net, batch) -> tuple[dict, int]:
            x, y, *cls = (t.to(d.device, non_blocking=True) for t in batch)  # (B, T, d), (B,)
            x1 = norm.normalize(x)  # the CLS token (B, C) is not normalised (as the official)
            x1 = (x1, *cls) if cls else x1
            value = flow_loss(
                net, x1, y, cfg.kappa, cfg.class_dropout, model_cfg.num_classes, cfg.time_dist
            )
            return {"loss": value}, len(x)

        def batches(epoch: int, start: int):
            """Whole optimiser steps only: the micro batches that do not fill one are left out."""
            return islice(
                loader.epoch(epoch, start_step=start), steps_per_epoch * run.accum - start
            )

        samples = (
            bool(cfg.sample_every) and schedule.total >= cfg.sample_every
        )  # a step to sample at
        monitor = (
            SampleMonitor(cfg, store, model_cfg, norm, flow, d) if d.main and samples else None
        )

        def after_step(step: int) -> dict:
            if monitor is None or step % cfg.sample_every:
                return {}
            values = monitor(ema.module, run)
            run.record({"step": step, **values})
            if cfg.best_by_fd and values["fd_dinov2"] < run.state["best_fd"]:
                run.state["best_fd"] = values["fd_dinov2"]
                run.save(run.out / "best")
            return values

        hooks = LoopHooks(
            batches=batches,
            loss=loss,
            lr=schedule,
            save=run.save,
            after_update=lambda: ema.update(model),
            after_step=after_step,
            acts_at=lambda step: bool(monitor) and step % cfg.sample_every == 0,
        )
        return run.loop("train-dit", schedule.total, hooks)
