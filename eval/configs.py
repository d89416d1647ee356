"""The config of `flatdino sweep-cfg`, each field an option with its default and help
(pipeline/options.py). No torch: the CLI builds its options from it; sweep.py re-exports it."""

from __future__ import annotations

from dataclasses import dataclass

from ..models.configs import CFG_INTERVAL
from ..pipeline.options import DEVICE_HELP, PRECISION_HELP, PROGRESS_HELP
from ..pipeline.options import option as opt
from ..sampling.configs import CHECKPOINT_HELP, SampleConfig


@dataclass(frozen=True)
class SweepConfig:
    """Everything `sweep_cfg` needs; the CLI only fills it in."""

    dit: str = opt(path=True, help=CHECKPOINT_HELP)
    features: str = opt(
        path=True,
        help="Reference feature store (e.g. the val split): FD-DINOv2 against its view-0 "
        "features, FID against the images it was extracted from.",
    )
    out: str = opt(path=True, help="Output folder: sweep.csv, heatmap.png, sweep.json.")
    scales: tuple[float, ...] = opt(
        (1.0, 2.0, 3.0, 4.5, 6.0),
        help="Guidance weights w (>= 1; 1: no guidance), comma-separated.",
    )
    interval_starts: tuple[float, ...] = opt(
        (0.0, 0.1, CFG_INTERVAL[0], 0.35),
        help="Where guidance starts: guided while t (0 noise, 1 data) is in start..1; "
        "comma-separated.",
    )
    n: int = opt(
        1000,
        flags=("--n",),
        min=2,
        help="Samples per cell, cycling through the classes (balanced).",
    )
    seed: int = opt(0, help="Seed of the noise; every cell starts from the same.")
    steps: int = opt(50, min=1, help="Euler steps.")
    batch_size: int = opt(  # as `sample --batch-size`: the bits depend on it
        64, min=1, help="Samples per batch (cells match `sample` at the same value)."
    )
    ema: bool = opt(True, help="Use the EMA weights (--no-ema: the raw ones).")
    vae: str | None = opt(
        None, path=True, help="VAE checkpoint; default: the one recorded in the DiT's flow.json."
    )
    decoder: str | None = opt(
        None,
        path=True,
        help="Pixel decoder (RAE's model.pt or a train-decoder run): also FID on the pixels.",
    )
    inception_weights: str | None = opt(
        None,
        path=True,
        help="pt_inception-2015-12-05-6726825d.pth for FID; default: the torch hub cache.",
    )
    device: str = opt("auto", help=DEVICE_HELP)
    precision: str = opt("auto", help=PRECISION_HELP)
    overwrite: bool = opt(
        False, flags=("--overwrite",), help="Replace a sweep of another config in --out."
    )
    progress: bool = opt(True, help=PROGRESS_HELP)

    def cell(self, w: float, start: float) -> SampleConfig:
        """The `flatdino sample` config that draws cell (w, start)'s samples."""
        return SampleConfig(
            dit=self.dit,
            out=self.out,
            n=self.n,
            seed=self.seed,
            steps=self.steps,
            cfg=w,
            cfg_interval=(start, CFG_INTERVAL[1]),
            ema=self.ema,
            decoder=self.decoder,
            vae=self.vae,
            batch_size=self.batch_size,
            device=self.device,
            precision=self.precision,
            progress=False,
        )
