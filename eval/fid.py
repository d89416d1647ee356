"""`flatdino eval fid`: Fréchet distance, precision and recall between two sets (paper §4.3).

A set is any of: a folder of images, a `samples.npz` of `flatdino sample` (arr_0 uint8 N×H×W×3),
a feature store (view 0), a `features.npy` (N, P, C), or saved statistics (`.npz` with mu and
sigma, written by `--save-stats`). Two feature spaces:
- `inception`: the 2048-d pool features of the standard FID network (pytorch-fid's InceptionV3).
  Its weights file (pt_inception-2015-12-05-6726825d.pth) is taken from the torch hub cache or
  `--inception-weights PATH`; without it this is a clear error, never a download.
- `dinov2`: FD-DINOv2 with the pipeline's own backbone: images become view-0 DINOv2 patch
  features (as extract-features computes them), mean-pooled over patches; stores and features.npy
  are pooled the same way.
The distance is pytorch-fid's `calculate_frechet_distance` (scipy's matrix square root).
Precision and recall follow Kynkäänniemi et al. 2019 (k-NN balls, k = 3) on the same vectors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flatdino.pipeline.backbone import load_backbone
from flatdino.pipeline.checkpoints import load_pixel_decoder, load_vae, resolve_vae
from flatdino.pipeline.errors import FlatDinoError, WeightsError
from flatdino.pipeline.feature_store import FeatureStore
from flatdino.pipeline.preprocess import ViewRecipe, adm_center_crop, make_views
from flatdino.pipeline.store import store_kind
from flatdino.pipeline.targets import TargetImages

from .knn import pooled

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def frechet_distance(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    from pytorch_fid.fid_score import calculate_frechet_distance

    return float(calculate_frechet_distance(a[0], a[1], b[0], b[1]))


def statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of the rows of x (n, D), in float64."""
    x = np.asarray(x, dtype=np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


@torch.no_grad()
def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict[str, float]:
    """Kynkäänniemi et al.: a sample counts when it falls in the k-NN ball of a sample of the
    other set; precision for fake in real's manifold, recall for real in fake's."""
    r, f = torch.from_numpy(real).double(), torch.from_numpy(fake).double()

    def radii(x):  # distance to the k-th nearest other point
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values

    def covered(points, ref, ref_radii):
        return (torch.cdist(points, ref) <= ref_radii[None]).any(1).double().mean().item()

    return {"precision": covered(f, r, radii(r)), "recall": covered(r, f, radii(f)), "k": k}


def _images(path: Path) -> np.ndarray:
    """uint8 (N, H, W, 3) from a samples.npz or a folder of images (sorted by name)."""
    if path.suffix == ".npz":
        return np.load(path)["arr_0"]
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FlatDinoError(
            f"{str(path)!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])


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


@torch.no_grad()
def image_vectors(images: np.ndarray, space: str, backbone: str, weights: str | None,
                  inception_weights: str | None, batch: int = 64) -> np.ndarray:  # fmt: skip
    """(N, D) vectors of uint8 images in the chosen space."""
    if space == "inception":
        model = inception_model(inception_weights)
        prep = lambda x: x  # noqa: E731  # pytorch-fid resizes to 299 and normalises itself
    else:
        model = load_backbone(backbone, weights)[0].eval()
        recipe = ViewRecipe(views=1)

        def prep(x):  # the view 0 of extract-features: ADM crop, 224, ImageNet normalisation
            crops = [
                adm_center_crop(Image.fromarray(im), recipe.crop_size)
                for im in x.permute(0, 2, 3, 1).mul(255).byte().numpy()
            ]
            return torch.cat([make_views(c, 0, recipe) for c in crops])

    out = []
    for i in range(0, len(images), batch):
        x = (
            torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float() / 255
        )  # (B, 3, H, W)
        y = model(prep(x))
        y = y[0] if isinstance(y, list) else y
        out.append(y.reshape(len(x), -1).numpy() if space == "inception" else y.mean(1).numpy())
    return np.concatenate(out).astype(np.float64)


def load_set(path: str, space: str, backbone: str = "dinov2-vitb14-reg", weights: str | None = None,
             inception_weights: str | None = None) -> tuple[np.ndarray | None, tuple]:  # fmt: skip
    """(vectors or None, (mu, sigma)) of one set; saved statistics give no vectors."""
    p = Path(path)
    kind = store_kind(p) if p.is_dir() else None
    if kind is not None:
        if space != "dinov2":
            raise FlatDinoError(
                f"{path!r} is a store of features: it can only be compared with --space dinov2"
            )

        vectors = pooled(str(p))[0].astype(np.float64)
    elif p.suffix == ".npz" and "mu" in np.load(p):
        stats = np.load(p)
        return None, (stats["mu"], stats["sigma"])
    elif p.suffix == ".npy":
        if space != "dinov2":
            raise FlatDinoError(f"{path!r} holds features: compare it with --space dinov2")
        vectors = np.load(p).astype(np.float64).mean(1)  # (N, P, C) -> (N, C)
    elif p.is_dir() or p.suffix == ".npz":
        vectors = image_vectors(_images(p), space, backbone, weights, inception_weights)
    else:
        raise FlatDinoError(
            f"{path!r} is not an image folder, samples.npz, store, features.npy or stats .npz"
        )
    if len(vectors) < 2:
        raise FlatDinoError(
            f"{path!r} holds {len(vectors)} sample(s); a Fréchet distance needs at least 2"
        )
    return vectors, statistics(vectors)


@torch.no_grad()
def reconstructions(features: str, vae_path: str, decoder_path: str, images: int = 1000,
                    batch: int = 32, device: str = "cpu") -> dict[str, np.ndarray]:  # fmt: skip
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
