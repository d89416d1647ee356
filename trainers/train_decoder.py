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

import numpy as np
import torch

from ..models.pixel_decoder import PIXEL_DECODER_PRESETS, PixelDecoder, pixel_decoder_preset
from ..pipeline.errors import FlatDinoError
from ..pipeline.feature_store import FeatureStore
from ..pipeline.loader import FeatureBatches, LoaderConfig
from ..pipeline.targets import TargetImages
from .configs import TrainDecoderConfig
from .loop import LoopHooks
from .optim import make_schedule
from .pictures import tile, to_uint8
from .run import start_run
from .runner import setup_distributed

log = logging.getLogger("flatdino.train")


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


def _check(cfg: TrainDecoderConfig, store: FeatureStore) -> None:
    if cfg.preset not in PIXEL_DECODER_PRESETS:
        raise FlatDinoError(
            f"--preset must be one of {sorted(PIXEL_DECODER_PRESETS)}; got {cfg.preset!r}"
        )
    if cfg.run.steps is None and cfg.run.epochs is None:
        raise FlatDinoError("give the run length with --steps N or --epochs E")
    if cfg.perceptual_weight or cfg.adversarial_weight:
        raise FlatDinoError(
            "perceptual and adversarial terms are extension points without weights here "
            "(LPIPS / a DINO discriminator); set perceptual_weight and adversarial_weight to 0 "
            "in the --config file"
        )


def train_decoder(cfg: TrainDecoderConfig) -> dict:
    """Train (or resume) a pixel decoder as `cfg` says; returns the final metrics."""
    d = setup_distributed(cfg.run.device, cfg.run.dist_timeout)
    store = FeatureStore.open_complete(cfg.features, "--features")
    _check(cfg, store)
    _, _, p, c = store.features.shape
    model_cfg = pixel_decoder_preset(cfg.preset, in_dim=int(c), num_patches=int(p))
    targets = TargetImages(store, cfg.image_threads)  # checks that the images can be read back
    with start_run(cfg, model_cfg.to_dict(), d) as run:
        loader = FeatureBatches(
            store,
            LoaderConfig(run.micro, cfg.run.seed, 1024, cfg.num_workers, d.rank, d.world),
        )
        schedule = make_schedule(cfg, max(1, loader.steps_per_epoch() // run.accum))
        model = run.build(lambda: PixelDecoder(model_cfg))
        log.info(
            "pixel decoder %s: %.2fM parameters, %d steps, accum %d",
            cfg.preset,
            sum(q.numel() for q in model.parameters()) / 1e6,
            schedule.total,
            run.accum,
        )

        def batches(epoch: int, start: int):
            views = loader.views(epoch)
            for x, _, rows in loader.epoch(epoch, start_step=start):
                yield x, targets.batch(rows, views[rows])

        def loss(net, batch) -> tuple[dict, int]:
            x, target = (t.to(d.device, non_blocking=True) for t in batch)
            pred = net(add_feature_noise(x.float(), cfg.noise_tau))  # (B, 3, S, S)
            return decoder_loss(pred, target, cfg, reduce_over=run.micro), len(x)

        every = cfg.grid_every if cfg.grid_images and d.main else 0  # rank 0 draws the grid
        if every:  # fixed: the same images at every step
            rows = store.valid_rows(cfg.grid_images)
            fixed = torch.from_numpy(store.features.get_orthogonal_selection((rows, 0))).float()
            truth = to_uint8(targets.batch(rows, np.zeros(len(rows), int)))

        @torch.no_grad()
        def after_step(step: int) -> dict:
            if every and (step % every == 0 or step == schedule.total):
                model.eval()
                pred = to_uint8(model(fixed.to(d.device)))
                model.train()
                run.image("reconstructions", tile(np.concatenate([truth, pred]), len(rows)))
            return {}

        hooks = LoopHooks(
            batches=batches, loss=loss, lr=schedule, save=run.save, after_step=after_step
        )
        return run.loop("train-decoder", schedule.total, hooks)
