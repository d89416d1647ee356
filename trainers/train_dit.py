"""`flatdino train-dit`: LightningDiT flow matching on cached latents (single process or torchrun).

Neither DINOv2 nor the FlatDINO encoder runs here: the latents store from `encode-latents` is read
into memory once and the loop (trainers/loop.py, shared with train-vae) only runs the DiT.

A checkpoint folder holds model.safetensors (raw weights), ema.safetensors (the fp32 EMA the
sampler uses by default), latent_stats.safetensors (the normalisation to undo after sampling),
config.json (the DiTConfig) and flow.json (κ, time distribution, the latents store and the VAE it
came from), so `flatdino sample` never needs an option typed again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

import torch
import zarr
from timm.utils import ModelEmaV3

from flatdino.pipeline.errors import FlatDinoError
from flatdino.pipeline.latents import KIND as LATENTS
from flatdino.pipeline.loader import LatentBatches, LoaderConfig, check_views
from flatdino.pipeline.store import store_kind

from .dit import DIT_PRESETS, DiTConfig, LightningDiT, dit_preset
from .flow import LatentNorm, flow_loss
from .loop import LoopConfig, LoopHooks, train_loop
from .optim import WSDSchedule, param_groups
from .runner import (
    Dist,
    resume_run,
    run_setup,
    save_checkpoint,
    seed_ranks,
    setup_distributed,
    setup_run_dir,
    split_batch,
    trainer_state,
    wrap_model,
)  # fmt: skip

log = logging.getLogger("flatdino.train")


@dataclass(frozen=True)
class TrainDiTConfig:
    """Everything `train_dit` needs; saved as RUN/config.json. Defaults are the paper's (§4.3)."""

    latents: str  # latents store from encode-latents
    out: str  # run folder
    preset: str = "dit-xl"  # key of trainers.dit.DIT_PRESETS; T, d and classes come from the store
    steps: int | None = None  # total optimiser steps (or use epochs)
    epochs: int | None = None  # total epochs over the store's valid images
    batch_size: int = 1024  # global batch (all ranks, all accumulation steps)
    micro_batch: int | None = None  # per-device batch; None: batch_size / world (no accumulation)
    lr: float = 2e-4  # constant after the warmup
    warmup_steps: int = 0  # linear warmup from 1e-6
    weight_decay: float = 0.0  # AdamW decay on 2-D weights (LightningDiT trains with 0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max grad norm (0: off)
    ema_decay: float = 0.9995  # EMA of the weights, kept in fp32
    kappa: float = 3.0  # time shift t' = t / (κ - (κ - 1) t)
    time_dist: str = "uniform"  # uniform | logit-normal
    class_dropout: float = 0.1  # labels replaced by the null class, for CFG
    normalize: bool = False  # standardise latents per (token, dim) with the store's mu_mean/mu_std
    views: int | None = None  # train on the first K stored views (1: view 0 only); None: all
    seed: int = 0  # model init and data order
    log_every: int = 100
    ckpt_every: int = 5000  # checkpoints/ (and always at the end of an invocation)
    device: str = "auto"
    compile: bool = False  # torch.compile the model
    resume: bool = False  # continue RUN/checkpoints
    stop_after: int | None = None  # end this invocation (with a checkpoint) after N more steps
    progress: bool = True


def open_latents(path: str) -> zarr.Group:
    """A complete latents store, or a one-line error that says what to run."""
    kind = store_kind(path)
    if kind != LATENTS:
        found = "no Zarr store there" if kind is None else f"kind {kind!r}"
        raise FlatDinoError(
            f"--latents {path!r} is not a latents store ({found}); "
            "pass the --out of `flatdino encode-latents`"
        )
    group = zarr.open_group(str(path), mode="r")
    if not group.attrs.get("complete"):
        raise FlatDinoError(f"--latents {path!r} is incomplete; finish encode-latents first")
    return group


def build_model_config(cfg: TrainDiTConfig, group: zarr.Group) -> DiTConfig:
    """The preset with T, d and the class count taken from the store."""
    if cfg.preset not in DIT_PRESETS:
        raise FlatDinoError(f"--preset must be one of {sorted(DIT_PRESETS)}; got {cfg.preset!r}")
    _, _, t, d = group["mu"].shape
    names = group.attrs.get("class_names")
    classes = len(names) if names else int(group["labels"][:].max()) + 1
    return dit_preset(cfg.preset, tokens=int(t), latent_dim=int(d), num_classes=classes)


def flow_record(cfg: TrainDiTConfig, group: zarr.Group) -> dict:
    """flow.json: how the model was trained and on what, for the sampler and for resume checks."""
    attrs = group.attrs
    return {
        "kappa": cfg.kappa, "time_dist": cfg.time_dist, "class_dropout": cfg.class_dropout,
        "normalize": cfg.normalize, "views": check_views(cfg.views, group["mu"].shape[1], cfg.latents),
        "latents": str(Path(cfg.latents).resolve()),
        "latents_fingerprint": attrs.get("fingerprint"), "vae_checkpoint": attrs.get("vae_checkpoint"),
        "class_names": attrs.get("class_names"),
    }  # fmt: skip


def latent_norm(cfg: TrainDiTConfig, group: zarr.Group, model_cfg: DiTConfig) -> LatentNorm:
    if not cfg.normalize:
        return LatentNorm.identity(model_cfg.tokens, model_cfg.latent_dim)
    return LatentNorm(torch.from_numpy(group["mu_mean"][:]), torch.from_numpy(group["mu_std"][:]))


def _check_resume(out: Path, flow: dict) -> None:
    """Refuse to continue a run on another latents store (other VAE or other features)."""
    saved = out / "checkpoints" / "flow.json"
    if saved.exists():
        old = json.loads(saved.read_text())
        for key in ("latents_fingerprint", "normalize", "kappa", "time_dist", "views"):
            if key in old and old[key] != flow[key]:  # runs from before --views have no "views"
                raise FlatDinoError(
                    f"run {str(out)!r} was trained with {key} = {old.get(key)!r}, this invocation "
                    f"has {flow[key]!r}; resume with the same --latents and flow options"
                )


def _schedule(
    cfg: TrainDiTConfig, loader: LatentBatches, accum: int, d: Dist
) -> tuple[int, WSDSchedule]:
    """(optimiser steps per epoch, the LR schedule): constant after an optional linear warmup."""
    steps_per_epoch = loader.steps_per_epoch() // accum
    if steps_per_epoch < 1:
        raise FlatDinoError(
            f"--batch-size {cfg.batch_size} is larger than the {len(loader.latents) * d.world} "
            f"valid images of --latents {cfg.latents!r}; choose a smaller --batch-size"
        )
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    warmup = min(cfg.warmup_steps, total)
    return steps_per_epoch, WSDSchedule(peak=cfg.lr, warmup=warmup, stable=total - warmup)


def train_dit(cfg: TrainDiTConfig) -> dict:
    """Train (or resume) a DiT on a latents store as `cfg` says; returns the final metrics."""
    d = setup_distributed(cfg.device)
    out = Path(cfg.out)
    group = open_latents(cfg.latents)
    model_cfg = build_model_config(cfg, group)
    if cfg.steps is None and cfg.epochs is None:
        raise FlatDinoError("give the run length with --steps N or --epochs E")
    if cfg.time_dist not in ("uniform", "logit-normal"):
        raise FlatDinoError(f"--time-dist must be uniform or logit-normal; got {cfg.time_dist!r}")
    micro, accum = split_batch(cfg.batch_size, cfg.micro_batch, d)
    flow = flow_record(cfg, group)
    if cfg.resume:
        _check_resume(out, flow)
    setup_run_dir(out, {"train": asdict(cfg), "model": model_cfg.to_dict()}, d, cfg.resume)
    loader = LatentBatches(cfg.latents, LoaderConfig(micro, cfg.seed, 0, 0, d.rank, d.world),
                           progress=cfg.progress and d.main, views=cfg.views)  # fmt: skip
    steps_per_epoch, schedule = _schedule(cfg, loader, accum, d)
    torch.manual_seed(cfg.seed)
    model = LightningDiT(model_cfg).to(d.device)
    ema = ModelEmaV3(model, decay=cfg.ema_decay, dtype=torch.float32)
    norm = latent_norm(cfg, group, model_cfg).to(d.device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    state = {"step": 0, "micro_step": 0, "epoch": 0}
    setup = run_setup(cfg.batch_size, micro, cfg.seed, d)
    seed_ranks(cfg.seed, d)
    if cfg.resume:
        resume_run(None, out, model, model_cfg.to_dict(), opt, state, d, setup, {"ema": ema.module})
    net = wrap_model(model, d, cfg.compile)
    log.info("model %s: %.2fM parameters, T=%d d=%d, %d classes, %d steps (%d/epoch), accum %d",
             cfg.preset, sum(p.numel() for p in model.parameters()) / 1e6, model_cfg.tokens,
             model_cfg.latent_dim, model_cfg.num_classes, schedule.total, steps_per_epoch, accum)  # fmt: skip

    def loss(net, batch) -> tuple[dict, int]:
        x, y = (t.to(d.device, non_blocking=True) for t in batch)  # (B, T, d), (B,)
        x1 = norm.normalize(x)
        value = flow_loss(net, x1, y, cfg.kappa, cfg.class_dropout, model_cfg.num_classes,
                          cfg.time_dist)  # fmt: skip
        return {"loss": value}, len(x)

    def save(path: Path) -> None:
        save_checkpoint(path, model, model_cfg.to_dict(), trainer_state(opt, state, d, setup), d,
                        {"ema": ema.module, "latent_stats": norm}, {"flow": flow})  # fmt: skip

    def batches(epoch: int, start: int):
        """Whole optimiser steps only: the micro batches that do not fill one are left out."""
        return islice(loader.epoch(epoch, start_step=start), steps_per_epoch * accum - start)

    hooks = LoopHooks(
        batches=batches,
        loss=loss,
        lr=schedule,
        save=save,
        after_update=lambda: ema.update(model),
    )
    lc = LoopConfig("train-dit", schedule.total, accum, cfg.grad_clip, cfg.log_every, cfg.ckpt_every,
                    cfg.stop_after, cfg.progress)  # fmt: skip
    return train_loop(lc, d, out, net, opt, hooks, state)
