"""`flatdino train-vae`: the FlatDINO VAE on a cached feature store (single process or torchrun)."""

from __future__ import annotations

import logging
from collections import deque

import numpy as np
import torch

from ..models.vae import VAE_PRESETS, FlatDinoVAE, VAEConfig, kl_weight, vae_loss, vae_preset
from ..pipeline.checkpoints import load_pixel_decoder
from ..pipeline.env import fast_matmul
from ..pipeline.errors import FlatDinoError
from ..pipeline.feature_store import FeatureStore
from ..pipeline.loader import FeatureBatches, LoaderConfig
from ..pipeline.quantise import to_device
from .configs import TrainVAEConfig
from .loop import LoopHooks, autocast_for
from .optim import make_schedule
from .pictures import FeaturePCA, tile, to_uint8
from .run import TrainingRun, start_run
from .runner import Dist, NonFiniteLossError, setup_distributed

log = logging.getLogger("flatdino.train")


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


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, path: str, d: Dist, batch: int, precision: str = "auto"
) -> dict[str, float]:
    """Mean reconstruction loss and relative error ‖x̂−x‖/‖x‖ on view 0 of a store, with z = mu
    (the networks in --precision, as training, the sums in float64).

    Each rank reads one contiguous range of the valid rows (its share, not the whole store) and
    sums on its own device, so the one all-reduce takes a device tensor (NCCL refuses CPU ones)
    and nothing waits for the GPU until the end."""
    was_training = model.training
    model.eval()
    store = FeatureStore(path)
    rows = np.array_split(store.valid_rows(), d.world)[d.rank]  # contiguous: rank-local reads
    sums = torch.zeros(3, dtype=torch.float64, device=d.device)  # sq. error, sq. norm, elements
    for i in range(0, len(rows), batch):
        lo, hi = rows[i], rows[min(i + batch, len(rows)) - 1] + 1
        block = store.features[lo:hi, 0]  # one contiguous read, view 0
        x = torch.from_numpy(block[rows[i : i + batch] - lo]).to(d.device).float()  # (B, P, C)
        with fast_matmul(d.device, precision), autocast_for(d.device, precision):
            x_hat = model(x, sample=False)[0].float()
        sums[0] += (x_hat - x).pow(2).sum(dtype=torch.float64)
        sums[1] += x.pow(2).sum(dtype=torch.float64)
        sums[2] += x.numel()
    if d.world > 1:
        torch.distributed.all_reduce(sums)
    model.train(was_training)
    mse, rel = (sums[0] / sums[2]).item(), (sums[0] / sums[1]).sqrt().item()
    return {"val_mse": mse, "val_rel_err": rel}


class ReconstructionGrid:
    """The first `n` valid val images, view 0: their features (or pixels, through `decoder`) on
    the top row and the VAE's reconstructions (z = mu) below, the same images at every step."""

    def __init__(self, path: str, n: int, decoder: str | None, device: torch.device):
        store = FeatureStore(path)
        rows = store.valid_rows(n)
        self.x = torch.from_numpy(store.features.get_orthogonal_selection((rows, 0))).float()
        self.decoder = load_pixel_decoder(decoder)[0].to(device) if decoder else None
        shape = tuple(self.x.shape[1:])
        if self.decoder and (self.decoder.cfg.num_patches, self.decoder.cfg.in_dim) != shape:
            raise FlatDinoError(
                f"--decoder {decoder!r} expects ({self.decoder.cfg.num_patches}, "
                f"{self.decoder.cfg.in_dim}) features but --val-features holds {shape}; use a "
                "decoder for this backbone"
            )
        self.pca = FeaturePCA(self.x.numpy()) if self.decoder is None else None
        self.device = device

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> np.ndarray:
        was_training = model.training
        x = self.x.to(self.device)
        x_hat = model.eval()(x, sample=False)[0].float()
        model.train(was_training)
        if self.decoder is not None:
            pictures = to_uint8(self.decoder(torch.cat([x, x_hat])))
        else:
            pictures = self.pca(torch.cat([x, x_hat]).cpu().numpy())
        return tile(pictures, cols=len(x))


def _validate(cfg: TrainVAEConfig, run: TrainingRun, grid: ReconstructionGrid | None) -> dict:
    """Validation metrics; saves best/ when the validation MSE improves."""
    state = run.state
    val = evaluate(run.model, cfg.val_features, run.d, run.micro, cfg.run.precision)
    run.record({"step": state["step"], **val})
    log.info(
        "step=%d val_mse=%.4g val_rel_err=%.4g", state["step"], val["val_mse"], val["val_rel_err"]
    )
    if grid is not None:
        run.image("val/reconstructions", grid(run.model))
    if val["val_mse"] < state["best"]:
        state["best"] = val["val_mse"]
        run.save_weights(run.out / "best")
    return val


def train_vae(cfg: TrainVAEConfig) -> dict:
    """Train (or resume) a VAE as `cfg` says; returns the final metrics."""
    d = setup_distributed(cfg.run.device, cfg.run.dist_timeout)
    store = FeatureStore.open_complete(cfg.features, "--features")
    model_cfg = build_model_config(cfg, store)
    check_store(store, model_cfg, "--features")
    if cfg.val_features:
        check_store(
            FeatureStore.open_complete(cfg.val_features, "--val-features"),
            model_cfg,
            "--val-features",
        )
    if cfg.run.steps is None and cfg.run.epochs is None:
        raise FlatDinoError("give the run length with --steps N or --epochs E")
    if cfg.decoder and not cfg.val_features:
        raise FlatDinoError(
            "--decoder draws the reconstruction grid of each validation; give --val-features too"
        )
    with start_run(cfg, model_cfg.to_dict(), d) as run:
        loader = FeatureBatches(
            store,
            LoaderConfig(
                run.micro, cfg.run.seed, cfg.shuffle_buffer, cfg.num_workers, d.rank, d.world
            ),
        )
        steps_per_epoch = max(1, loader.steps_per_epoch() // run.accum)
        schedule = make_schedule(cfg, steps_per_epoch)
        model = run.build(lambda: FlatDinoVAE(model_cfg), {"best": float("inf")})
        beta = (
            cfg.beta if cfg.beta is not None else kl_weight(model_cfg.tokens, model_cfg.latent_dim)
        )
        log.info(
            "model %s: %.2fM parameters, T=%d d=%d, beta=%.3g, %d steps (%d/epoch), accum %d",
            cfg.preset,
            sum(p.numel() for p in model.parameters()) / 1e6,
            model_cfg.tokens,
            model_cfg.latent_dim,
            beta,
            schedule.total,
            steps_per_epoch,
            run.accum,
        )

        # (step, rows) of the micro batches since the loop last checked for a non-finite step
        recent = deque(maxlen=run.accum * (min(cfg.run.log_every, cfg.run.ckpt_every) + 1))

        def loss(net, batch) -> tuple[dict, int]:
            recent.append((run.state["step"], batch[2]))
            x = to_device(batch[0], d.device)  # (B, P, C) float32; int8 dequantised here
            x_hat, mu, logvar = net(x)
            return vae_loss(x, x_hat, mu, logvar, beta, cfg.recon, reduce_over=run.micro), len(x)

        grid = None
        if cfg.val_features and d.main and cfg.grid_images > 0:
            grid = ReconstructionGrid(cfg.val_features, cfg.grid_images, cfg.decoder, d.device)

        def decays_at(step: int) -> bool:
            return step == schedule.decay_start and bool(schedule.decay)

        def validates_at(step: int) -> bool:
            return bool(cfg.val_features) and (step % cfg.eval_every == 0 or step == schedule.total)

        def after_step(step: int) -> dict:
            if decays_at(step):
                run.save(run.out / "pre-decay")
            return _validate(cfg, run, grid) if validates_at(step) else {}

        hooks = LoopHooks(
            batches=lambda epoch, start: loader.epoch(epoch, start_step=start),
            loss=loss,
            lr=schedule,
            save=run.save,
            after_step=after_step,
            acts_at=lambda step: decays_at(step) or validates_at(step),
        )
        try:
            return run.loop("train-vae", schedule.total, hooks)
        except NonFiniteLossError as e:
            rows = [r for step, r in recent if step == e.step] or [r for _, r in recent]
            blame = _blame_the_data(store, np.concatenate(rows))
            if blame is None:
                raise
            raise blame from e


def _blame_the_data(store: FeatureStore, rows: np.ndarray) -> FlatDinoError | None:
    """A non-finite step whose input rows hold NaN or inf: name the store and the rows (the rows
    of that one step are re-read, nothing else), not the learning rate."""
    rows = np.unique(rows)
    if len(rows) == 0:
        return None
    block = store.features.get_orthogonal_selection((rows,))  # (k, V, P, C)
    bad = rows[~np.isfinite(block.reshape(len(rows), -1)).all(axis=1)]
    if len(bad) == 0:
        return None
    shown = ", ".join(map(str, bad[:5].tolist())) + (", ..." if len(bad) > 5 else "")
    return FlatDinoError(
        f"--features {str(store.path)!r} holds NaN or inf in row(s) {shown}, read by the step "
        "where the loss became non-finite; rebuild the store with `flatdino extract-features "
        "--overwrite` (the last good checkpoint is intact)"
    )
