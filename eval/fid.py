"""`flatdino eval fid`: Fréchet distance, precision and recall between two sets (paper §4.3).

A set is any of: a folder of images (searched recursively: an ImageFolder tree or `sample`'s
images/, mixed sizes and formats), a Parquet manifest (`path`, `label`), a `samples.npz` (arr_0
uint8 N×H×W×3, the ADM evaluator's layout), a feature store, a `features.npy` (N, P, C) of
`sample --save-features`, or saved statistics (`.npz` with mu, sigma and how they were computed,
written by `--save-stats`). Every image gets the pipeline's ADM centre crop to 256 first.
Two feature spaces:
- `inception`: the 2048-d pool features of the standard FID network (pytorch-fid's InceptionV3,
  which resizes to 299 itself). Its weights file (pt_inception-2015-12-05-6726825d.pth) is taken
  from the torch hub cache or `--inception-weights PATH`; without it this is a clear error, never a
  download. A feature store in this space stands for the images it was extracted from.
- `dinov2`: FD-DINOv2 with the pipeline's own backbone: images become view-0 DINOv2 patch
  features (as extract-features computes them), mean-pooled over patches; stores and features.npy
  are pooled the same way.

Memory stays bounded whatever the set's size: images are decoded by a thread pool a few batches
ahead of the network, and only the running sums of x and x xᵀ (float64) are kept, so 50K samples
or ImageNet's 1.28M references work on a machine that cannot hold them. Precision and recall
(Kynkäänniemi et al. 2019, k = 3, as the ADM evaluator) need the vectors: a seeded subset of at
most `pr_samples` per side, with k-NN radii and coverage computed in row blocks, never an N×N
matrix. Unreadable images are skipped and counted; more than `max_failed_fraction` of a set is an
error, as in extract-features. Two sides computed differently (feature network, its weights, the
crop or input resolution) are refused, naming what differs.

This module is the stage. Its parts: `fid_sets` reads the sets, `fid_stats` holds one side's
statistics (and saved ones), `feature_net` the two networks, `precision_recall` the k-NN measures;
rFID is `eval.rfid`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..pipeline.env import resolve_device
from ..pipeline.errors import FlatDinoError
from ..pipeline.frechet import RunningStats, frechet_distance, statistics  # noqa: F401  (eval fid's API)
from .feature_net import FeatureNet, inception_model  # noqa: F401  (eval fid's API)
from .fid_sets import image_files, load_set, npz_crop  # noqa: F401  (eval fid's API)
from .fid_stats import IDENTITY_FIELDS, check_comparable, is_saved_stats, save_stats
from .precision_recall import precision_recall


@dataclass(frozen=True)
class FidConfig:
    """Everything `fid` needs; the CLI only fills it in."""

    real: str  # reference set (see the module docstring for the kinds)
    fake: str | None = None  # the set to compare (None: only save --real's statistics)
    space: str = "inception"  # inception | dinov2
    backbone: str = "dinov2-vitb14-reg"  # the dinov2 space's network for images
    weights: str | None = None  # its local weights
    inception_weights: str | None = None  # local pt_inception-2015-12-05-6726825d.pth
    device: str = "auto"
    batch_size: int = 64  # images per forward pass of the feature network
    workers: int = 8  # threads decoding images
    max_failed_fraction: float = 0.01  # more unreadable images than this in a set is an error
    precision_recall: bool = False
    pr_samples: int = 50_000  # at most this many vectors per side for precision/recall
    k: int = 3  # neighbours of the k-NN radii
    save_stats: str | None = None  # write the reference's statistics here
    progress: bool = True


def fid(cfg: FidConfig) -> dict:
    """FD (and precision/recall) between cfg.real and cfg.fake; returns the result record."""
    if cfg.batch_size < 1 or cfg.workers < 1 or cfg.pr_samples < cfg.k + 1:
        raise FlatDinoError("--batch-size and --workers must be at least 1, --pr-samples above k")
    if not 0.0 <= cfg.max_failed_fraction <= 1.0:
        raise FlatDinoError("--max-failed-fraction must be in [0, 1]")
    _check_request(cfg)  # before the --real pass, which can take an hour
    built: list[FeatureNet] = []

    def net() -> FeatureNet:  # built once, only when a side needs it
        if not built:
            built.append(FeatureNet(cfg))
        return built[0]

    real = load_set(cfg.real, cfg, net)
    if cfg.save_stats:  # kept at once: a failure on --fake does not lose the --real pass
        save_stats(real, cfg.save_stats)
    if not cfg.fake:  # the reference's statistics only, to save and reuse
        return {
            "real": cfg.real,
            "space": cfg.space,
            "real_count": real.count,
            "real_failed": real.failed,
            "saved": cfg.save_stats,
            "identity": real.identity,
        }
    fake = load_set(cfg.fake, cfg, net)
    check_comparable(real, fake)
    result = {
        "real": cfg.real,
        "fake": cfg.fake,
        "space": cfg.space,
        "fd": frechet_distance(real.stats, fake.stats),
        "real_count": real.count,
        "fake_count": fake.count,
        "real_failed": real.failed,
        "fake_failed": fake.failed,
        "identity": {k: real.identity.get(k) or fake.identity.get(k) for k in IDENTITY_FIELDS},
    }
    if cfg.precision_recall:
        for side in (real, fake):
            if side.vectors is None or len(side.vectors) <= cfg.k:
                raise FlatDinoError(
                    f"--precision-recall needs more than k={cfg.k} samples per set; {side.path!r} "
                    f"has {side.count}"
                )
        device = str(resolve_device(cfg.device))
        result.update(precision_recall(real.vectors, fake.vectors, cfg.k, device))
        result["pr_samples"] = [len(real.vectors), len(fake.vectors)]
    return result


def _check_request(cfg: FidConfig) -> None:
    """The refusals that need no feature network, made before any set is read."""
    if not cfg.fake and not cfg.save_stats:
        raise FlatDinoError(
            "give --fake to compare with, or --save-stats to keep --real's statistics"
        )
    if cfg.save_stats and not cfg.save_stats.endswith(".npz"):
        raise FlatDinoError(f"--save-stats {cfg.save_stats!r} must name a .npz file")
    for option, path in (("--real", cfg.real), ("--fake", cfg.fake)):
        if path and not Path(path).exists():
            raise FlatDinoError(f"{option} {path!r} does not exist")
        if cfg.precision_recall and path and is_saved_stats(path):
            raise FlatDinoError(
                f"--precision-recall needs both sets as samples; {option} {path!r} is saved "
                "statistics (drop --precision-recall, or pass the images)"
            )
