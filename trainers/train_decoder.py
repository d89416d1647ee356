"""`flatdino train-decoder`: a pixel decoder from cached DINOv2 features to the images they came from.

For domains other than ImageNet (the paper's Appendix A: the ImageNet decoder distorts colours out
of domain) and for the offline demo. Each sample is one stored view's features and the pixels of
that view at crop resolution (`preprocess.view_pixels`: the ADM centre crop, its flip, or the same
random crop), read from the store's manifest. Loss: L1 + MSE in [0, 1] pixel space, with RAE's
noise augmentation on the input features (x + σ·ε, σ ~ U(0, τ) per sample, τ = 0.8).

Extension points: RAE also trains with an LPIPS perceptual term and a DINO-discriminator GAN term.
Both need pretrained weights this machine cannot download; `perceptual_weight` and
`adversarial_weight` are the config fields for them and `decoder_loss` is where they go. Until a
network is wired in, a non-zero weight is refused rather than silently ignored.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from flatdino.pipeline.errors import FlatDinoError
from flatdino.pipeline.loader import FeatureBatches, LoaderConfig
from flatdino.pipeline.preprocess import ViewRecipe, adm_center_crop, to_rgb, view_pixels
from flatdino.pipeline.sources import load_image
from flatdino.pipeline.store import FeatureStore

from .loop import LoopConfig, LoopHooks, train_loop
from .optim import make_schedule, param_groups
from .pixel_decoder import PIXEL_DECODER_PRESETS, PixelDecoder, pixel_decoder_preset
from .runner import (
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
class TrainDecoderConfig:
    """Everything `train_decoder` needs; saved as RUN/config.json."""

    features: str  # feature store (its manifest names the images)
    out: str  # run folder
    preset: str = "rae-vitxl"  # key of trainers.pixel_decoder.PIXEL_DECODER_PRESETS
    steps: int | None = None  # total optimiser steps (or use epochs)
    epochs: int | None = None
    warmup_steps: int | None = None  # default: 10% of the run
    decay_steps: int | None = None  # default: 10% of the run
    batch_size: int = 256  # global batch
    micro_batch: int | None = None  # per-device batch (gradient accumulation below batch/world)
    lr: float = 2e-4  # peak learning rate (warmup-stable-decay)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    noise_tau: float = 0.8  # RAE's feature noise: sigma ~ U(0, tau) per sample (0: off)
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    perceptual_weight: float = 0.0  # extension point: LPIPS (needs weights; refused if > 0)
    adversarial_weight: float = 0.0  # extension point: GAN (needs weights; refused if > 0)
    seed: int = 0
    num_workers: int = 2  # feature loader processes per rank
    image_threads: int = 4  # threads decoding target images
    log_every: int = 20
    ckpt_every: int = 500
    device: str = "auto"
    compile: bool = False
    resume: bool = False
    stop_after: int | None = None
    progress: bool = True


def decoder_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    cfg: TrainDecoderConfig,
    reduce_over: int | None = None,
) -> dict:
    """L1 + MSE on [0, 1] pixels (per-sample means over `reduce_over` samples, so an empty tail
    batch on one rank contributes zero). Perceptual and adversarial terms would be added here."""
    n = max(1, pred.shape[0] if reduce_over is None else reduce_over)
    diff = pred.float() - target.float()
    l1 = diff.abs().flatten(1).mean(1).sum() / n
    mse = diff.pow(2).flatten(1).mean(1).sum() / n
    psnr = -10 * torch.log10(mse.detach().clamp_min(1e-10))  # of the batch, for the logs
    return {"loss": cfg.l1_weight * l1 + cfg.mse_weight * mse, "l1": l1, "mse": mse, "psnr": psnr}


def add_feature_noise(x: torch.Tensor, tau: float) -> torch.Tensor:
    """RAE's augmentation: x + σ·ε with σ ~ U(0, τ) drawn per sample."""
    if tau <= 0:
        return x
    sigma = torch.rand(x.shape[0], 1, 1, device=x.device) * tau
    return x + sigma * torch.randn_like(x)


class TargetImages:
    """The pixels of (row, view) pairs of a feature store, decoded by a thread pool."""

    def __init__(self, store: FeatureStore, threads: int):
        fp = store.attrs.get("fingerprint", {})
        self.kind, self.root = fp.get("input", {}).get("kind"), store.attrs.get("input_root", "")
        self.recipe = ViewRecipe(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in fp.get("preprocessing", {}).items()})  # fmt: skip
        self.paths = store.manifest().column("path").to_pylist()
        self.pool = ThreadPoolExecutor(max(1, threads))
        first = (
            int(np.flatnonzero(store.group["valid"][:])[0]) if store.attrs.get("num_valid") else 0
        )
        try:
            self.one(first, 0)
        except Exception as e:  # moved or deleted source images: say so before any training
            raise FlatDinoError(
                f"cannot read the images of --features {str(store.path)!r} back (first: "
                f"{self.paths[first]!r} under {self.root!r}: {e}); train-decoder needs the images "
                "at the paths extract-features read them from"
            ) from e

    def one(self, row: int, view: int) -> np.ndarray:
        with load_image(self.kind, self.root, self.paths[row]) as img:
            crop = adm_center_crop(to_rgb(img), self.recipe.crop_size)
        return view_pixels(crop, row, view, self.recipe)  # (S, S, 3) uint8

    def batch(self, rows: np.ndarray, views: np.ndarray) -> torch.Tensor:
        """(B, 3, S, S) float in [0, 1]."""
        if len(rows) == 0:  # a rank's empty tail batch
            return torch.zeros(0, 3, self.recipe.crop_size, self.recipe.crop_size)
        pixels = list(self.pool.map(self.one, rows.tolist(), views.tolist()))
        return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div_(255.0)


def _check(cfg: TrainDecoderConfig, store: FeatureStore) -> None:
    if cfg.preset not in PIXEL_DECODER_PRESETS:
        raise FlatDinoError(
            f"--preset must be one of {sorted(PIXEL_DECODER_PRESETS)}; got {cfg.preset!r}"
        )
    if not store.attrs.get("complete"):
        raise FlatDinoError(
            f"--features {cfg.features!r} is incomplete; finish extract-features first"
        )
    if cfg.steps is None and cfg.epochs is None:
        raise FlatDinoError("give the run length with --steps N or --epochs E")
    if cfg.perceptual_weight or cfg.adversarial_weight:
        raise FlatDinoError(
            "perceptual and adversarial terms are extension points without weights here "
            "(LPIPS / a DINO discriminator); set perceptual_weight and adversarial_weight to 0 "
            "in the --config file"
        )


def train_decoder(cfg: TrainDecoderConfig) -> dict:
    """Train (or resume) a pixel decoder as `cfg` says; returns the final metrics."""
    d = setup_distributed(cfg.device)
    out = Path(cfg.out)
    store = FeatureStore(cfg.features)
    _check(cfg, store)
    _, _, p, c = store.features.shape
    model_cfg = pixel_decoder_preset(cfg.preset, in_dim=int(c), num_patches=int(p))
    micro, accum = split_batch(cfg.batch_size, cfg.micro_batch, d)
    targets = TargetImages(store, cfg.image_threads)  # checks that the images can be read back
    setup_run_dir(out, {"train": asdict(cfg), "model": model_cfg.to_dict()}, d, cfg.resume)
    loader = FeatureBatches(cfg.features, LoaderConfig(micro, cfg.seed, 1024, cfg.num_workers,
                                                       d.rank, d.world))  # fmt: skip
    schedule = make_schedule(cfg, max(1, loader.steps_per_epoch() // accum))
    torch.manual_seed(cfg.seed)
    model = PixelDecoder(model_cfg).to(d.device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    state = {"step": 0, "micro_step": 0, "epoch": 0}
    setup = run_setup(cfg.batch_size, micro, cfg.seed, d)
    seed_ranks(cfg.seed, d)
    if cfg.resume:
        resume_run(None, out, model, model_cfg.to_dict(), opt, state, d, setup)
    net = wrap_model(model, d, cfg.compile)
    log.info("pixel decoder %s: %.2fM parameters, %d steps, accum %d", cfg.preset,
             sum(q.numel() for q in model.parameters()) / 1e6, schedule.total, accum)  # fmt: skip

    def batches(epoch: int, start: int):
        views = loader.views(epoch)
        for x, _, rows in loader.epoch(epoch, start_step=start):
            yield x, targets.batch(rows, views[rows])

    def loss(net, batch) -> tuple[dict, int]:
        x, target = (t.to(d.device, non_blocking=True) for t in batch)
        pred = net(add_feature_noise(x.float(), cfg.noise_tau))  # (B, 3, S, S)
        return decoder_loss(pred, target, cfg, reduce_over=micro), len(x)

    hooks = LoopHooks(
        batches=batches, loss=loss, lr=schedule,
        save=lambda path: save_checkpoint(path, model, model_cfg.to_dict(), trainer_state(opt, state, d, setup), d),
    )  # fmt: skip
    lc = LoopConfig("train-decoder", schedule.total, accum, cfg.grad_clip, cfg.log_every,
                    cfg.ckpt_every, cfg.stop_after, cfg.progress)  # fmt: skip
    return train_loop(lc, d, out, net, opt, hooks, state)
