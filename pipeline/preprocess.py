"""Decode any image robustly and turn it into the stored views (normalised 224×224 tensors).

View 0: ADM centre crop to 256 (guided-diffusion's `center_crop_arr`, which RAE uses), then RAE's
`encode`: to [0, 1], a bicubic resize to 224 without antialias, ImageNet mean/std (the features the
published pixel decoder was trained on; stores made before this recipe antialiased, and say so). View 1: the horizontal flip of view 0.
Views >= 2: a random-resized crop (scale 0.3-1, ratio 3/4-4/3) of the 256 crop with a random flip,
drawn from a generator seeded by (seed, image index, view), so any view can be recomputed alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..models.dinov2 import IMAGENET_MEAN, IMAGENET_STD

MAX_PIXELS = 16_384 * 16_384  # larger images are refused (marked invalid), not decoded into RAM


@dataclass(frozen=True)
class ViewRecipe:
    """How an image becomes `views` normalised input tensors (recorded in the store's attrs)."""

    views: int = 2  # stored views per image: 0 centre crop, 1 its flip, >=2 random crops
    seed: int = 0  # seeds the random-resized crops of views >= 2
    crop_size: int = 256  # ADM centre crop (the RAE decoder's output resolution)
    input_size: int = 224  # backbone input: 16x16 patches of 14 pixels
    rrc_scale: tuple[float, float] = (0.3, 1.0)  # area fraction of the random crops
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range of the random crops
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # RAE's encode resizes 256 -> 224 bicubic without antialias. Stores made before this field
    # resized with antialias and have no "antialias" key: `from_attrs` reads them as True.
    antialias: bool = False

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_attrs(cls, recipe: dict) -> ViewRecipe:
        """The recipe a store's fingerprint records (older stores: antialiased)."""
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe.items()}
        return cls(**{"antialias": True, **values})


def to_rgb(img: Image.Image) -> Image.Image:
    """Decode fully and convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, 1) to 8-bit RGB."""
    if img.width * img.height > MAX_PIXELS:
        raise ValueError(f"image of {img.width}x{img.height} pixels exceeds the {MAX_PIXELS} limit")
    img.load()  # raises on truncated or corrupt data
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's convert("RGB") clips high-bit-depth values at 255; rescale to 8 bits instead.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            hi = max(float(arr.max()), 1.0)  # floats: [0, 1], or [0, max] when larger
        elif img.mode.startswith("I;16") or arr.max() > 255:
            hi = 65535.0
        else:
            hi = 255.0
        arr = np.clip(np.rint(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's palette-transparency warning path
    return img if img.mode == "RGB" else img.convert("RGB")


def adm_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's centre crop: box-halve while >= 2x, bicubic to `size`, crop (size, size, 3)."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size].copy()  # own, writable memory


def _random_crop_box(rng: np.random.Generator, size: int, recipe: ViewRecipe) -> tuple[int, ...]:
    """torchvision's RandomResizedCrop.get_params on a square of side `size`, with numpy's rng."""
    area = size * size
    log_ratio = (math.log(recipe.rrc_ratio[0]), math.log(recipe.rrc_ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*recipe.rrc_scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= size and 0 < h <= size:
            return int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1)), h, w
    return 0, 0, size, size


def views_from_crops(
    crops: torch.Tensor,
    indices: Sequence[int],
    recipe: ViewRecipe,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(n, S, S, 3) uint8 crops of images `indices` -> (n, V, 3, 224, 224) float32 normalised views.

    Runs on `device` (default: the crops'), so a GPU worker makes its own views from uint8 crops
    (196,608 bytes an image shipped instead of V x 602,112 of float32 views). Views 0 and 1 are one
    resize of the whole batch; each random crop is resized alone (the boxes differ). Bit-identical
    on CPU to the views of each image made alone (tests/test_preprocess).
    """
    n, v = len(crops), recipe.views
    # NCHW-contiguous: CPU's bicubic is 2x faster than on the channels-last permute, same bits
    x = crops.to(device).permute(0, 3, 1, 2).contiguous().float().div_(255.0)  # (n, 3, S, S)
    size = (recipe.input_size, recipe.input_size)
    aa = recipe.antialias
    out = torch.empty((n, v, 3, *size), dtype=torch.float32, device=x.device)
    out[:, 0] = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=aa)
    if v > 1:
        out[:, 1] = out[:, 0].flip(-1)
    for i, index in enumerate(indices):
        for view in range(2, v):
            rng = np.random.default_rng([recipe.seed, int(index), view])
            top, left, h, w = _random_crop_box(rng, recipe.crop_size, recipe)
            patch = x[i : i + 1, :, top : top + h, left : left + w]
            y = F.interpolate(patch, size=size, mode="bicubic", align_corners=False, antialias=aa)
            out[i, view] = y[0].flip(-1) if rng.random() < 0.5 else y[0]
    mean = torch.tensor(recipe.mean, device=x.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(recipe.std, device=x.device).view(1, 1, 3, 1, 1)
    return out.sub_(mean).div_(std)


def make_views(crop: np.ndarray, index: int, recipe: ViewRecipe) -> torch.Tensor:
    """(256, 256, 3) uint8 crop of image `index` -> (V, 3, 224, 224) float32 normalised views."""
    return views_from_crops(torch.from_numpy(crop)[None], [index], recipe)[0]


def view_pixels(crop: np.ndarray, index: int, view: int, recipe: ViewRecipe) -> np.ndarray:
    """The pixels of stored view `view` at crop resolution: (256, 256, 3) uint8, the region and flip
    that `make_views` fed the backbone (the pixel decoder's target for that view's features)."""
    if view == 0:
        return crop
    if view == 1:
        return crop[:, ::-1].copy()
    rng = np.random.default_rng([recipe.seed, index, view])  # the same draws as make_views
    top, left, h, w = _random_crop_box(rng, recipe.crop_size, recipe)
    patch = torch.from_numpy(crop[top : top + h, left : left + w]).permute(2, 0, 1)[None].float()
    size = (recipe.crop_size, recipe.crop_size)  # an upscale, the same for every recipe
    out = F.interpolate(patch, size=size, mode="bicubic", align_corners=False, antialias=True)
    out = out.flip(-1) if rng.random() < 0.5 else out
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
