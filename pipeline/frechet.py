"""The Fréchet distance between Gaussians fitted to feature sets, and its running statistics.

Used by `flatdino eval fid` and by train-dit's FD during training; float64 throughout.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.linalg

from .errors import FlatDinoError
from .feature_store import FeatureStore

log = logging.getLogger(__name__)


def frechet_distance(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], eps: float = 1e-6
) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½), all in float64 (Heusel et al. 2017).

    The standard fix for a near-singular product (as pytorch-fid and the ADM evaluator): when the
    square root is not finite, both covariances get `eps`·I added; a numerically complex root
    keeps its real part when the imaginary part of its diagonal is negligible."""
    mu1, mu2 = np.asarray(a[0], np.float64), np.asarray(b[0], np.float64)
    s1, s2 = (
        np.atleast_2d(np.asarray(a[1], np.float64)),
        np.atleast_2d(np.asarray(b[1], np.float64)),
    )
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise FlatDinoError(
            f"the two sets have features of {mu1.shape[0]} and {mu2.shape[0]} dims; compare sets "
            "of the same feature space"
        )
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        log.warning(
            "Fréchet distance: singular product of covariances; adding %g to the diagonals", eps
        )
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise FlatDinoError(
                f"Fréchet distance: the covariances' product has a complex square root (imaginary "
                f"part {imag:.3g}); the statistics are broken (too few samples or non-finite features)"
            )
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of the rows of x (n, D), in float64."""
    acc = RunningStats(np.asarray(x).shape[1])
    acc.add(x)
    return acc.result()


class RunningStats:
    """Mean and covariance accumulated batch by batch in float64: n, Σx and Σxxᵀ."""

    def __init__(self, dim: int):
        self.n, self.sum, self.outer = 0, np.zeros(dim), np.zeros((dim, dim))

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        self.n += len(x)
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        mu = self.sum / self.n
        return mu, (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def store_statistics(path: str, max_rows: int | None = None) -> tuple[RunningStats, np.ndarray]:
    """(running statistics of a feature store's mean-pooled view-0 features, the first block's
    valid features) over at most `max_rows` valid rows taken as whole storage blocks spread
    evenly over the store (`ShardedStore.view0_blocks`)."""
    store = FeatureStore.open_complete(path, "the reference")
    acc, first = RunningStats(store.sample_shape[-1]), None
    for block in store.view0_blocks(max_rows):
        if len(block):
            first = block if first is None else first
            acc.add(block.mean(1))
    return acc, first
