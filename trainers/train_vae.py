"""`flatdino train-vae`: the FlatDINO VAE on a cached feature store (single process or torchrun)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from flatdino.pipeline.errors import FlatDinoError
from flatdino.pipeline.loader import FeatureBatches, LoaderConfig
from flatdino.pipeline.store import FeatureStore

from .loop import LoopConfig, LoopHooks, train_loop
from .optim import make_schedule, param_groups
from .runner import (
    Dist,
    append_metrics,
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
from .vae import VAE_PRESETS, FlatDinoVAE, VAEConfig, kl_weight, vae_loss, vae_preset

log = logging.getLogger("flatdino.train")


@dataclass(frozen=True)
class TrainVAEConfig:
    """Everything `train_vae` needs; saved as RUN/config.json."""

    features: str  # train feature store
    out: str  # run folder
    val_features: str | None = None  # validation store: selects best/
    preset: str = "flatdino-32x128"  # key of trainers.vae.VAE_PRESETS
    tokens: int | None = None  # override T of the preset
    latent_dim: int | None = None  # override d of the preset
    steps: int | None = None  # total optimiser steps (or use epochs)
    epochs: int | None = None  # total epochs; phases follow the paper (50 -> 5/40/5)
    warmup_steps: int | None = None  # default: 10% of the run (5 epochs with --epochs 50/150)
    decay_steps: int | None = None  # default: 10% of the run (5 / 22 epochs with 50 / 150)
    batch_size: int = 512  # global batch (all ranks, all accumulation steps)
    micro_batch: int | None = None  # per-device batch; None: batch_size / world (no accumulation)
    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.02  # on 2-D weights only
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max grad norm (0: off)
    beta: float | None = None  # KL weight; None: 1e-6 * 512 / (T * d)
    recon: str = "mse"  # mse (paper) | huber (the paper's public code)
    seed: int = 0  # model init and data order
    num_workers: int = 2  # loader processes per rank
    shuffle_buffer: int = 1024
    log_every: int = 20
    eval_every: int = 500  # validation + best/ (when --val-features is given)
    ckpt_every: int = 500  # checkpoints/ (and always at the end and at decay start)
    device: str = "auto"
    compile: bool = False  # torch.compile the model
    resume: bool = False  # continue RUN/checkpoints (or --resume-from)
    resume_from: str | None = None  # a checkpoint dir, e.g. RUN/pre-decay to extend a run
    stop_after: int | None = None  # end this invocation (with a checkpoint) after N more steps
    progress: bool = True


def build_model_config(cfg: TrainVAEConfig, store: FeatureStore) -> VAEConfig:
    """The preset with T, d overridden and P, C taken from the store."""
    if cfg.preset not in VAE_PRESETS:
        raise FlatDinoError(f"--preset must be one of {sorted(VAE_PRESETS)}; got {cfg.preset!r}")
    _, _, p, c = store.features.shape
    over = {k: v for k, v in {"tokens": cfg.tokens, "latent_dim": cfg.latent_dim}.items() if v}
    return vae_preset(cfg.preset, in_dim=int(c), num_patches=int(p), **over)


def check_store(store: FeatureStore, model_cfg: VAEConfig, what: str) -> None:
    """Refuse a store whose (P, C) does not match the model, before any training."""
    _, _, p, c = store.features.shape
    if (p, c) != (model_cfg.num_patches, model_cfg.in_dim):
        raise FlatDinoError(
            f"{what} {str(store.path)!r} holds (P, C) = ({p}, {c}) features but the model expects "
            f"({model_cfg.num_patches}, {model_cfg.in_dim}); use a store from the same backbone"
        )
    if not store.attrs.get("complete"):
        raise FlatDinoError(
            f"{what} {str(store.path)!r} is incomplete; finish extract-features first"
        )


@torch.no_grad()
def evaluate(model: torch.nn.Module, path: str, d: Dist, batch: int) -> dict[str, float]:
    """Mean reconstruction loss and relative error ‖x̂−x‖/‖x‖ on view 0 of a store, with z = mu."""
    was_training = model.training
    model.eval()
    group = FeatureStore(path).group
    valid = np.asarray(group["valid"][:], dtype=bool)
    rows = np.flatnonzero(valid)[d.rank :: d.world]
    sums = torch.zeros(3, dtype=torch.float64)  # squared error, squared norm, element count
    for i in range(0, len(rows), batch):
        lo, hi = rows[i], rows[min(i + batch, len(rows)) - 1] + 1
        block = group["features"][lo:hi, 0]  # one contiguous read, view 0
        x = torch.from_numpy(block[rows[i : i + batch] - lo]).to(d.device).float()  # (B, P, C)
        x_hat, _, _ = model(x, sample=False)
        sums += torch.tensor([(x_hat - x).pow(2).sum().item(), x.pow(2).sum().item(), x.numel()],
                             dtype=torch.float64)  # fmt: skip
    if d.world > 1:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    return {"val_mse": (sums[0] / sums[2]).item(), "val_rel_err": (sums[0] / sums[1]).sqrt().item()}


def _validate(
    cfg: TrainVAEConfig, out: Path, d: Dist, model, model_cfg: VAEConfig, state: dict, batch: int
) -> dict:
    """Validation metrics; saves best/ when the validation MSE improves."""
    val = evaluate(model, cfg.val_features, d, batch)
    append_metrics(out, {"step": state["step"], **val}, d)
    log.info(
        "step=%d val_mse=%.4g val_rel_err=%.4g", state["step"], val["val_mse"], val["val_rel_err"]
    )
    if val["val_mse"] < state["best"]:
        state["best"] = val["val_mse"]
        save_checkpoint(out / "best", model, model_cfg.to_dict(), None, d)
    return val


def _save(path: Path, model, model_cfg: VAEConfig, opt, state: dict, d: Dist, setup: dict) -> None:
    save_checkpoint(path, model, model_cfg.to_dict(), trainer_state(opt, state, d, setup), d)


def train_vae(cfg: TrainVAEConfig) -> dict:
    """Train (or resume) a VAE as `cfg` says; returns the final metrics."""
    d = setup_distributed(cfg.device)
    out = Path(cfg.out)
    store = FeatureStore(cfg.features)
    model_cfg = build_model_config(cfg, store)
    check_store(store, model_cfg, "--features")
    if cfg.val_features:
        check_store(FeatureStore(cfg.val_features), model_cfg, "--val-features")
    if cfg.steps is None and cfg.epochs is None:
        raise FlatDinoError("give the run length with --steps N or --epochs E")
    micro, accum = split_batch(cfg.batch_size, cfg.micro_batch, d)  # before the run folder exists
    setup_run_dir(
        out,
        {"train": asdict(cfg), "model": model_cfg.to_dict()},
        d,
        cfg.resume or bool(cfg.resume_from),
    )
    torch.manual_seed(cfg.seed)
    model = FlatDinoVAE(model_cfg).to(d.device)
    loader = FeatureBatches(
        cfg.features,
        LoaderConfig(micro, cfg.seed, cfg.shuffle_buffer, cfg.num_workers, d.rank, d.world),
    )
    steps_per_epoch = max(1, loader.steps_per_epoch() // accum)
    schedule = make_schedule(cfg, steps_per_epoch)
    opt = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, fused=False
    )
    beta = cfg.beta if cfg.beta is not None else kl_weight(model_cfg.tokens, model_cfg.latent_dim)
    state = {"step": 0, "micro_step": 0, "epoch": 0, "best": float("inf")}
    setup = run_setup(cfg.batch_size, micro, cfg.seed, d)
    seed_ranks(cfg.seed, d)
    if cfg.resume or cfg.resume_from:
        resume_run(cfg.resume_from, out, model, model_cfg.to_dict(), opt, state, d, setup)
    net = wrap_model(model, d, cfg.compile)
    log.info("model %s: %.2fM parameters, T=%d d=%d, beta=%.3g, %d steps (%d/epoch), accum %d",
             cfg.preset, sum(p.numel() for p in model.parameters()) / 1e6, model_cfg.tokens,
             model_cfg.latent_dim, beta, schedule.total, steps_per_epoch, accum)  # fmt: skip

    def loss(net, batch) -> tuple[dict, int]:
        x = batch[0].to(d.device, non_blocking=True).float()  # (B, P, C)
        x_hat, mu, logvar = net(x)
        return vae_loss(x, x_hat, mu, logvar, beta, cfg.recon, reduce_over=micro), len(x)

    def after_step(step: int) -> dict:
        if step == schedule.decay_start and schedule.decay:
            _save(out / "pre-decay", model, model_cfg, opt, state, d, setup)
        if cfg.val_features and (step % cfg.eval_every == 0 or step == schedule.total):
            return _validate(cfg, out, d, model, model_cfg, state, micro)
        return {}

    hooks = LoopHooks(
        batches=lambda epoch, start: loader.epoch(epoch, start_step=start),
        loss=loss,
        lr=schedule,
        save=lambda path: _save(path, model, model_cfg, opt, state, d, setup),
        after_step=after_step,
    )
    lc = LoopConfig("train-vae", schedule.total, accum, cfg.grad_clip, cfg.log_every,
                    cfg.ckpt_every, cfg.stop_after, cfg.progress)  # fmt: skip
    return train_loop(lc, d, out, net, opt, hooks, state)
