"""Pictures a run shows while it trains: image grids, and DINOv2 features as colours.

Features have no pixels; as DINO papers show them, the patch grid is projected on the first
three principal components of a fixed reference set (fitted once, so the colours of two steps
compare) and each component mapped to a colour channel.
"""

from __future__ import annotations

import numpy as np
import torch


def tile(images: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W, 3) -> one uint8 picture of `cols` columns on a white background."""
    n, h, w, _ = images.shape
    rows = -(-n // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = image
    return grid


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3)."""
    x = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


class FeaturePCA:
    """The first three principal components of reference patch features, and the 1st/99th
    percentiles of the projections, mapped to [0, 255] per channel."""

    def __init__(self, reference: np.ndarray, scale: int = 4):
        x = np.asarray(reference, np.float64).reshape(-1, reference.shape[-1])  # (N·P, C)
        self.mean = x.mean(0)
        _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.basis = vt[:3].T  # (C, 3)
        y = (x - self.mean) @ self.basis
        self.lo, self.hi = np.percentile(y, 1, axis=0), np.percentile(y, 99, axis=0)
        self.scale = scale

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """(B, P, C) -> uint8 (B, s·scale, s·scale, 3), s = √P (nearest-neighbour upscaled)."""
        f = np.asarray(features, np.float64)
        b, p, _ = f.shape
        side = int(round(p**0.5))
        y = ((f - self.mean) @ self.basis - self.lo) / np.maximum(self.hi - self.lo, 1e-12)
        rgb = (np.clip(y, 0, 1) * 255).round().astype(np.uint8).reshape(b, side, side, 3)
        return rgb.repeat(self.scale, axis=1).repeat(self.scale, axis=2)
