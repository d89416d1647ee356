"""Precision and recall of two sets of vectors (Kynkäänniemi et al. 2019, k = 3 as the ADM
evaluator): k-NN radii and coverage computed in row blocks of bounded memory, never an N×N matrix."""

from __future__ import annotations

import numpy as np
import torch


def _rows(n: int, m: int, budget: int) -> int:
    """Rows per block so that a block of distances (rows x m float32) fits in `budget` bytes."""
    return max(1, min(n, budget // (4 * max(1, m))))


@torch.no_grad()
def knn_radii(x: torch.Tensor, k: int, budget: int = 256 << 20) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest other row, one block of rows at a time."""
    step = _rows(len(x), len(x), budget)
    return torch.cat(
        [
            torch.cdist(x[i : i + step], x).kthvalue(k + 1, dim=1).values
            for i in range(0, len(x), step)
        ]
    )


@torch.no_grad()
def coverage(
    points: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, budget: int = 256 << 20
) -> float:
    """The fraction of `points` inside at least one k-NN ball of `ref`, block by block."""
    step = _rows(len(points), len(ref), budget)
    inside = [
        (torch.cdist(points[i : i + step], ref) <= radii[None]).any(1)
        for i in range(0, len(points), step)
    ]
    return torch.cat(inside).double().mean().item()


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, device: str = "cpu", budget: int = 256 << 20
) -> dict[str, float]:
    """Kynkäänniemi et al.: a sample counts when it falls in the k-NN ball of a sample of the
    other set; precision for fake in real's manifold, recall for real in fake's. Distances in
    float32 blocks of at most `budget` bytes."""
    r = torch.as_tensor(np.asarray(real, np.float32), device=device)
    f = torch.as_tensor(np.asarray(fake, np.float32), device=device)
    return {
        "precision": coverage(f, r, knn_radii(r, k, budget), budget),
        "recall": coverage(r, f, knn_radii(f, k, budget), budget),
        "k": k,
    }
