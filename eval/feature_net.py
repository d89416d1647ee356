"""The feature networks of `eval fid`: pytorch-fid's InceptionV3 (standard FID) and the pipeline's
DINOv2 backbone (FD-DINOv2), each with the identity of what computed its features."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..models.dinov2 import state_sha256
from ..pipeline.backbone import load_backbone
from ..pipeline.env import resolve_device
from ..pipeline.errors import FlatDinoError, WeightsError
from ..pipeline.preprocess import ViewRecipe, make_views

if TYPE_CHECKING:  # the stage's config; fid.py imports this module
    from .fid import FidConfig

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
CROP = 256  # the ADM centre crop every image set gets (the generated images' size)


def inception_model(weights: str | None):
    """pytorch-fid's InceptionV3 (pool3, 2048-d) from a local weights file; never downloads.

    pytorch-fid fetches its weights through `torch.hub.load_state_dict_from_url`; that one call is
    answered from the file (or the hub cache's copy), read with weights_only=True, so neither the
    hub directory nor anything else of the process is changed."""
    from unittest import mock

    import pytorch_fid.inception as fid_inception

    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if weights and not Path(weights).is_file():
        raise WeightsError(f"--inception-weights {weights!r} does not exist")
    if not weights and not cached.is_file():
        raise WeightsError(
            f"the FID Inception weights ({INCEPTION_FILE}) are not in the torch hub cache {str(cached.parent)!r}; "
            "download them where a network is available and pass --inception-weights PATH "
            "(or use --space dinov2)"
        )
    file = Path(weights) if weights else cached

    def from_file(*args, **kwargs) -> dict:
        return torch.load(file, map_location="cpu", weights_only=True)

    with mock.patch.object(fid_inception, "load_state_dict_from_url", from_file):
        return fid_inception.InceptionV3([3]).eval()


class FeatureNet:
    """The feature network of one space: uint8 ADM crops (B, 256, 256, 3) -> (B, D) float64, and
    the identity of what computed them (compared between the two sides of a distance)."""

    def __init__(self, cfg: FidConfig):
        self.space, self.device = cfg.space, resolve_device(cfg.device)
        if cfg.space == "inception":
            self.model = inception_model(cfg.inception_weights)
            sha = state_sha256(self.model)
            network, input_size = "pytorch-fid InceptionV3 pool3", 299  # it resizes itself
        elif cfg.space == "dinov2":
            self.model, sha = load_backbone(cfg.backbone, cfg.weights)  # sha as stores record it
            self.model.eval()
            self.recipe = ViewRecipe(views=1, crop_size=CROP)
            network, input_size = cfg.backbone, self.recipe.input_size
        else:
            raise FlatDinoError(f"--space must be inception or dinov2; got {cfg.space!r}")
        self.model.to(self.device)
        self.identity = {
            "space": cfg.space,
            "network": network,
            "weights_sha256": sha,
            "crop": CROP,
            "input_size": input_size,
        }
        if cfg.space == "dinov2":  # the resize to 224 is part of the feature space
            self.identity["antialias"] = self.recipe.antialias

    def prepare(self, crop: np.ndarray) -> torch.Tensor:
        """One crop's network input, made on a loader thread: uint8 (3, 256, 256) for Inception
        (pytorch-fid resizes to 299 and normalises itself), view 0 of extract-features for DINOv2."""
        if self.space == "inception":
            return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)
        return make_views(crop, 0, self.recipe)[0]

    @torch.no_grad()
    def __call__(self, inputs: list[torch.Tensor]) -> np.ndarray:
        """Features (B, D) float64 of a batch of `prepare`d inputs."""
        x = torch.stack(inputs).to(self.device)
        if self.space == "inception":  # [0, 1]
            y = self.model(x.float().div_(255.0))[0]  # (B, 2048, 1, 1)
            return y.reshape(len(inputs), -1).double().cpu().numpy()
        return self.model(x).mean(1).double().cpu().numpy()  # (B, C): patches mean-pooled
