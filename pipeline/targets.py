"""The pixels a feature store's rows came from: each stored view re-made from the source image.

What train-decoder learns to produce and what the evaluations compare against; read back through
the store's manifest, input root and recorded preprocessing recipe.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .errors import FlatDinoError
from .feature_store import FeatureStore
from .preprocess import ViewRecipe, adm_center_crop, to_rgb, view_pixels
from .sources import load_image


class TargetImages:
    """The pixels of (row, view) pairs of a feature store, decoded by a thread pool."""

    def __init__(self, store: FeatureStore, threads: int):
        fp = store.attrs.get("fingerprint", {})
        self.kind, self.root = fp.get("input", {}).get("kind"), store.attrs.get("input_root", "")
        self.recipe = ViewRecipe.from_attrs(fp.get("preprocessing", {}))
        self.paths = store.manifest().column("path").to_pylist()
        self.pool = ThreadPoolExecutor(max(1, threads))
        first = int(store.valid_rows()[0]) if store.attrs.get("num_valid") else 0
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
