"""Decoding every PIL mode, the ADM crop, the views, and the shard arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from skimage import data

from flatdino.pipeline.preprocess import (
    ViewRecipe,
    _random_crop_box,
    adm_center_crop,
    make_views,
    to_rgb,
    views_from_crops,
)
from flatdino.pipeline.store import shard_bounds

ASTRONAUT = Image.fromarray(data.astronaut())  # (512, 512) RGB


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I", "F", "RGB", "YCbCr"])
def test_every_mode_becomes_rgb_uint8(mode):
    img = to_rgb(ASTRONAUT.convert(mode))
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (512, 512, 3) and arr.dtype == np.uint8
    assert arr.std() > 10  # still a picture, not a flat colour


def test_sixteen_bit_is_rescaled_not_clipped():
    camera = data.camera().astype(np.uint16) * 257  # full 16-bit range
    arr = np.asarray(to_rgb(Image.fromarray(camera)))
    np.testing.assert_array_equal(arr[..., 0], data.camera())  # 8-bit values recovered exactly


def test_adm_center_crop_matches_the_recipe():
    # 600x400 -> min side 400 < 512: no halving; bicubic to 384x256, then centre crop 256
    img = Image.fromarray(data.coffee())  # (400, 600, 3)
    crop = adm_center_crop(img, 256)
    expected = np.asarray(img.resize((384, 256), resample=Image.BICUBIC))[:, 64:320]
    np.testing.assert_array_equal(crop, expected)
    # 3000x3000 -> BOX-halved while >= 512: 1500, 750, 375; then bicubic down to 256
    big = ASTRONAUT.resize((3000, 3000))
    halved = big
    for side in (1500, 750, 375):
        halved = halved.resize((side, side), Image.BOX)
    np.testing.assert_array_equal(
        adm_center_crop(big, 256), np.asarray(halved.resize((256, 256), Image.BICUBIC))
    )


def test_tiny_and_extreme_aspect_images_crop_to_256():
    assert adm_center_crop(Image.new("RGB", (1, 1)), 256).shape == (256, 256, 3)
    assert adm_center_crop(Image.new("RGB", (7000, 3)), 256).shape == (256, 256, 3)


def test_views_flip_and_seeded_random_crops():
    crop = adm_center_crop(ASTRONAUT, 256)
    recipe = ViewRecipe(views=5, seed=3)
    v = make_views(crop, index=7, recipe=recipe)
    assert v.shape == (5, 3, 224, 224) and v.dtype == torch.float32
    torch.testing.assert_close(v[1], v[0].flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(make_views(crop, 7, recipe), v, rtol=0, atol=0)  # reproducible
    other_index = make_views(crop, 8, recipe)
    torch.testing.assert_close(other_index[:2], v[:2], rtol=0, atol=0)  # fixed views agree
    assert not torch.equal(other_index[2:], v[2:])  # random crops depend on the image index
    assert not torch.equal(make_views(crop, 7, ViewRecipe(views=5, seed=4))[2:], v[2:])
    assert len({tuple(x.flatten()[:50].tolist()) for x in v}) == 5  # five distinct views


def _make_views_per_image(crop: np.ndarray, index: int, recipe: ViewRecipe) -> torch.Tensor:
    """`make_views` as it was before views were batched (one image, torch.cat), kept as the
    reference: the stores written with it must not change."""
    x = torch.from_numpy(crop).permute(2, 0, 1).float().div_(255.0).unsqueeze(0)
    size, aa = (recipe.input_size, recipe.input_size), recipe.antialias
    views = [F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=aa)]
    if recipe.views > 1:
        views.append(views[0].flip(-1))
    for v in range(2, recipe.views):
        rng = np.random.default_rng([recipe.seed, index, v])
        top, left, h, w = _random_crop_box(rng, recipe.crop_size, recipe)
        patch = x[:, :, top : top + h, left : left + w]
        view = F.interpolate(patch, size=size, mode="bicubic", align_corners=False, antialias=aa)
        views.append(view.flip(-1) if rng.random() < 0.5 else view)
    mean = torch.tensor(recipe.mean).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std).view(1, 3, 1, 1)
    return (torch.cat(views) - mean) / std


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("views", [1, 2, 3])
def test_batched_views_are_the_per_image_views_bit_for_bit(views, antialias):
    """`views_from_crops` on a batch of 5 photos equals the per-image reference exactly on CPU
    (bound 0, torch.equal): the one batched bicubic resize of views 0/1 computes every pixel as the
    per-image resize does (measured: max abs difference 0.0, with and without antialias), the
    random crops draw the same seeded boxes from each image's own index, and `make_views` (the
    batched function on one image) is the reference too."""
    names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")
    photos = [to_rgb(Image.fromarray(getattr(data, name)())) for name in names]
    crops = np.stack([adm_center_crop(img, 256) for img in photos])  # (5, 256, 256, 3)
    indices = [0, 7, 8, 64, 1000]
    recipe = ViewRecipe(views=views, seed=3, antialias=antialias)
    batched = views_from_crops(torch.from_numpy(crops), indices, recipe, "cpu")
    assert batched.shape == (5, views, 3, 224, 224) and batched.dtype == torch.float32
    for crop, index, got in zip(crops, indices, batched, strict=True):
        expected = _make_views_per_image(crop, index, recipe)
        assert torch.equal(got, expected)
        assert torch.equal(make_views(crop, index, recipe), expected)
    assert not torch.equal(batched[0], batched[1])  # each image its own views, not one repeated


def test_view_zero_is_normalised_with_imagenet_stats():
    white = np.full((256, 256, 3), 255, np.uint8)
    v = make_views(white, 0, ViewRecipe(views=1))
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(v[0, :, 100, 100], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("image", ["astronaut", "coffee", "chelsea", "rocket"])
def test_view_zero_is_raes_encode_on_real_images(image):
    """RAE's transform sequence, written out as its code runs it (bytetriper/RAE: the ADM
    `center_crop_arr` + ToTensor of its data pipeline, then `RAE.encode`: bicubic to 224 with
    align_corners=False and no antialias, ImageNet mean/std): the default recipe is bit-identical;
    the antialiased recipe of older stores is not."""
    import torchvision.transforms.functional as TF

    crop = adm_center_crop(to_rgb(Image.fromarray(getattr(data, image)())), 256)
    x = TF.to_tensor(Image.fromarray(crop))[None]  # (1, 3, 256, 256) in [0, 1]
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(make_views(crop, 0, ViewRecipe(views=1)), expected, rtol=0, atol=0)
    old = make_views(crop, 0, ViewRecipe(views=1, antialias=True))
    assert (old - expected).abs().max() > 1e-2


def test_stores_from_before_the_rae_recipe_read_as_antialiased():
    assert ViewRecipe.from_attrs({"views": 2, "seed": 0}).antialias is True
    assert ViewRecipe.from_attrs(ViewRecipe().to_dict()) == ViewRecipe()
    assert ViewRecipe().antialias is False


@given(n=st.integers(0, 5000), size=st.integers(1, 300))
def test_shards_tile_the_rows_exactly(n, size):
    shards = shard_bounds(n, size)
    assert [s.index for s in shards] == list(range(len(shards)))
    assert sum(s.stop - s.start for s in shards) == n
    for a, b in zip(shards, shards[1:], strict=False):
        assert a.stop == b.start and a.stop - a.start == size  # only the last may be short
    assert all(s.start % size == 0 for s in shards)  # aligned to chunk/shard boundaries
