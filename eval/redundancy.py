"""`flatdino eval redundancy`: how redundant DINOv2 patch features are (paper §4.2, Table 3, Fig. 5).

Two measurements on the first `images` valid images of a feature store (view 0):
- PCA: the number of principal components that hold 95% of the variance of the patch features
  (C dims per patch) against that of the raw pixel patches they came from (14×14×3 = 588 dims of
  the 224×224 backbone input, re-read through the store's manifest);
- spatial redundancy: the mean cosine similarity between two patch features of the same image
  against the distance between the patches on the 16×16 grid (in patch units, rounded).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..pipeline.errors import FlatDinoError
from ..pipeline.feature_store import FeatureStore
from ..pipeline.targets import TargetImages


def pca_dims(x: np.ndarray, fraction: float = 0.95) -> int:
    """Components needed to explain `fraction` of the variance of the rows of x (n, D)."""
    x = torch.from_numpy(np.asarray(x, dtype=np.float64))
    x = x - x.mean(0)
    var = torch.linalg.svdvals(x) ** 2  # the PCA spectrum, largest first
    explained = torch.cumsum(var, 0) / var.sum()
    return (
        int(torch.searchsorted(explained, torch.tensor(fraction, dtype=explained.dtype)).item()) + 1
    )


def similarity_by_distance(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distances, mean cosine similarity at each) over images of patch features (n, P, C)."""
    n, p, _ = features.shape
    side = math.isqrt(p)
    ys, xs = np.divmod(np.arange(p), side)
    dist = np.rint(np.hypot(ys[:, None] - ys[None], xs[:, None] - xs[None])).astype(
        np.int64
    )  # (P, P)
    f = F.normalize(torch.from_numpy(features.astype(np.float32)), dim=-1)
    sim = (f @ f.transpose(1, 2)).mean(0).numpy()  # (P, P), averaged over images
    bins = np.unique(dist)
    return bins, np.array([sim[dist == b].mean() for b in bins])


def pixel_patches(store: FeatureStore, rows: np.ndarray, patch: int = 14) -> np.ndarray:
    """(len(rows)·P, patch·patch·3) raw pixels in [0, 1] of the backbone input (view 0)."""
    targets = TargetImages(store, threads=4)  # view 0 at crop size, re-read through the manifest
    size = (targets.recipe.input_size, targets.recipe.input_size)
    crops = targets.batch(rows, np.zeros(len(rows), int))  # (n, 3, 256, 256)
    aa = targets.recipe.antialias
    x = F.interpolate(crops, size=size, mode="bicubic", align_corners=False, antialias=aa)
    return F.unfold(x, patch, stride=patch).transpose(1, 2).reshape(-1, 3 * patch * patch).numpy()


def redundancy(features: str, images: int = 256, fraction: float = 0.95) -> dict:
    """Both measurements on the first `images` valid images of a feature store."""
    store = FeatureStore(features)
    rows = store.valid_rows(images)
    if len(rows) == 0:
        raise FlatDinoError(f"--features {features!r} holds no valid image")
    feats = store.features.get_orthogonal_selection((rows, 0)).astype(np.float32)  # (n, P, C)
    pixels = pixel_patches(store, rows)
    distances, similarity = similarity_by_distance(feats)
    return {
        "features": features,
        "images": int(len(rows)),
        "fraction": fraction,
        "feature_dims": int(feats.shape[-1]),
        "feature_pca_dims": pca_dims(feats.reshape(-1, feats.shape[-1]), fraction),
        "pixel_dims": int(pixels.shape[1]),
        "pixel_pca_dims": pca_dims(pixels, fraction),
        "distance": distances.tolist(),
        "cosine_similarity": similarity.tolist(),
    }


def plot_redundancy(result: dict, path: str) -> None:
    """Left: PCA dims for the variance fraction; right: similarity against patch distance."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(9, 3.5))
    (a, b) = fig.subplots(1, 2)
    names = [
        f"DINOv2 patches\n({result['feature_dims']} dims)",
        f"pixel patches\n({result['pixel_dims']} dims)",
    ]
    a.bar(
        names,
        [result["feature_pca_dims"], result["pixel_pca_dims"]],
        color=["tab:blue", "tab:gray"],
    )
    a.set_ylabel(f"PCA components for {result['fraction']:.0%} variance")
    b.plot(result["distance"], result["cosine_similarity"], marker="o")
    b.set_xlabel("distance between patches (patch units)")
    b.set_ylabel("mean cosine similarity")
    fig.suptitle(f"{result['images']} images of {result['features']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
