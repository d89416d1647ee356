"""`flatdino eval rfid`: rFID, the Fréchet distance between a store's images and their
reconstructions: the pixel decoder on the features, and on the VAE's reconstruction of them (the
two together isolate the VAE's cost). Computed on view 0 of the first `images` valid images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..pipeline.checkpoints import load_pixel_decoder, load_vae, resolve_vae
from ..pipeline.feature_store import FeatureStore
from ..pipeline.frechet import frechet_distance
from ..pipeline.targets import TargetImages
from .feature_net import FeatureNet
from .fid import FidConfig
from .fid_sets import array_blocks


@dataclass(frozen=True)
class RfidConfig:
    """Everything `rfid` needs; the CLI only fills it in."""

    features: str  # validation feature store (its images are re-read)
    vae: str  # train-vae run folder or checkpoint folder
    decoder: str  # pixel decoder: RAE's model.pt or a train-decoder run
    space: str = "inception"  # inception | dinov2 (see `eval fid`)
    backbone: str = "dinov2-vitb14-reg"  # the dinov2 space's network
    weights: str | None = None  # its local weights
    inception_weights: str | None = None  # local FID Inception weights file
    images: int = 1000  # valid images used (the first N)
    device: str = "cpu"  # for the VAE, the decoder and the feature network


def rfid(cfg: RfidConfig) -> dict:
    """rFID (images vs decoder(VAE(features))), the decoder alone, and the VAE's share."""
    sets = reconstructions(cfg.features, cfg.vae, cfg.decoder, cfg.images, device=cfg.device)
    net = FeatureNet(
        FidConfig(
            real="",
            space=cfg.space,
            backbone=cfg.backbone,
            weights=cfg.weights,
            inception_weights=cfg.inception_weights,
            device=cfg.device,
        )
    )
    stats = {name: array_stats(x, net) for name, x in sets.items()}
    return {
        "space": cfg.space,
        "images": int(len(sets["images"])),
        "rfid": frechet_distance(stats["images"], stats["vae_decoder"]),
        "rfid_decoder_only": frechet_distance(stats["images"], stats["decoder"]),
        "fd_vae_vs_decoder_only": frechet_distance(stats["decoder"], stats["vae_decoder"]),
    }


@torch.no_grad()
def reconstructions(
    features: str,
    vae_path: str,
    decoder_path: str,
    images: int = 1000,
    batch: int = 32,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """uint8 (N, H, W, 3) sets for rFID on view 0 of a store's first `images` valid images: the
    true crops, the pixel decoder on the features, and the decoder on the VAE's reconstruction."""
    store = FeatureStore(features)
    vae = load_vae(resolve_vae(vae_path))[0].to(device)
    decoder = load_pixel_decoder(decoder_path)[0].to(device)
    rows = store.valid_rows(images)
    targets = TargetImages(store, 4)
    to_uint8 = lambda x: (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # noqa: E731
    sets: dict[str, list] = {"images": [], "decoder": [], "vae_decoder": []}
    for i in range(0, len(rows), batch):
        r = rows[i : i + batch]
        x = torch.from_numpy(store.features.get_orthogonal_selection((r, 0))).float().to(device)
        sets["images"].append(to_uint8(targets.batch(r, np.zeros(len(r), int))))
        sets["decoder"].append(to_uint8(decoder(x)))
        sets["vae_decoder"].append(to_uint8(decoder(vae.decode(vae.encode(x)[0]))))
    return {k: np.concatenate(v) for k, v in sets.items()}


def array_stats(
    images: np.ndarray, net: FeatureNet, batch: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of in-memory uint8 images (N, H, W, 3), ADM-cropped to 256 where needed."""
    blocks = (images[i : i + batch] for i in range(0, len(images), batch))
    return array_blocks(blocks, len(images), net, None, "images", progress=False).stats
