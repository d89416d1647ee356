"""The pipeline lines the end-to-end tests never reach (the coverage ledger, docs/coverage.md):
refusals of bad input behind options the CLI already bounds (kept for Python callers), weights
nested under another key, an image over the pixel limit, a worker that loaded other weights,
negative manifest labels, an uninstalled package's version, read-only crops and the random crop's
fallback box. All in-process and tiny (the tiny backbone, the v2 fixture's VAE)."""

from __future__ import annotations

import struct
import zlib
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import fake_feature_store, tiny_config
from flatdino.pipeline import env, extract, preprocess
from flatdino.pipeline.backbone import load_backbone, read_state_dict
from flatdino.pipeline.checkpoints import resolve_vae, vae_sha256
from flatdino.pipeline.encode import EncodeConfig, ShardEncoder, encode_latents
from flatdino.pipeline.errors import FlatDinoError, InputError, MetadataError, WeightsError
from flatdino.pipeline.feature_store import FeatureStore
from flatdino.pipeline.preprocess import ViewRecipe, _random_crop_box
from flatdino.pipeline.sources import open_source
from flatdino.pipeline.store import Shard

VAE = Path(__file__).parent / "fixtures" / "format-v2" / "vae"


def one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


def test_weights_directory_without_weights_is_refused(tmp_path):
    with pytest.raises(WeightsError, match=r"has neither model.safetensors nor pytorch_model.bin"):
        read_state_dict(str(tmp_path))


def test_weights_nested_under_teacher_load(tmp_path):
    """DINOv2 training checkpoints keep the weights under "teacher" (or "model", "state_dict")."""
    model, sha = load_backbone("tiny")
    torch.save({"teacher": model.vit.state_dict(), "iteration": 7}, tmp_path / "ckpt.pth")
    assert load_backbone("tiny", str(tmp_path / "ckpt.pth"))[1] == sha


def test_unknown_backbone_names_the_choices():
    with pytest.raises(
        WeightsError, match=r"unknown backbone 'vit-h'; choose --backbone from \["
    ) as e:
        load_backbone("vit-h")
    assert "'tiny'" in one_line(e)


LAYOUT = dict(
    shape=(8, 1, 256, 8),
    labels=np.zeros(8, np.int32),
    paths=[str(i) for i in range(8)],
    class_names=["a"],
    attrs={},
)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            dict(shard_size=12, chunk_rows=8),
            r"^shard size 12 must be a multiple of chunk rows 8; change --shard-size$",
        ),
        (
            dict(shard_size=8, chunk_rows=8, feature_dtype="bfloat16"),
            r"^--feature-dtype must be one of \('float16', 'int8'\)",
        ),
    ],
)
def test_feature_store_layout_refuses_bad_settings(settings, message):
    with pytest.raises(FlatDinoError, match=message):
        FeatureStore.layout(**LAYOUT, **settings)


def test_store_without_manifest_says_what_to_do(tmp_path):
    path = fake_feature_store(tmp_path / "f.zarr", channels=8)
    (path / "manifest.parquet").unlink()
    with pytest.raises(MetadataError, match=r"has no manifest.parquet; restore the file, or dele"):
        FeatureStore(path).manifest()


def test_encode_worker_with_another_vae_is_refused(tmp_path):
    """A Ray worker that finds another file at the VAE's path refuses (called here, no Ray)."""
    cfg = EncodeConfig(features="f", vae=str(VAE), out=str(tmp_path / "l.zarr"), device="cpu")
    ckpt = resolve_vae(str(VAE))
    sha = vae_sha256(ckpt)
    with pytest.raises(
        FlatDinoError,
        match=rf"^worker loaded VAE {sha[:12]}, driver 000000000000; --vae must be the same files",
    ):
        ShardEncoder(cfg, str(ckpt), "0" * 64)


def test_encode_refuses_a_latent_dtype_it_cannot_store(tmp_path):
    cfg = EncodeConfig(features="f", vae=str(VAE), out=str(tmp_path / "l.zarr"), dtype="bfloat16")
    with pytest.raises(
        FlatDinoError, match=r"^--dtype must be float32 or float16; got 'bfloat16'$"
    ):
        encode_latents(cfg)


def test_package_version_when_not_installed(monkeypatch):
    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(env, "version", missing)
    assert env.package_version() == "unknown"


def test_read_only_crops_reach_the_backbone_as_a_writable_copy(monkeypatch):
    """Ray hands shards over read-only; torch must not wrap that memory (undefined on write)."""
    model, _ = load_backbone("tiny")
    recipe = ViewRecipe(views=1)
    crops = np.random.default_rng(0).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    args = (model, np.array([0]), recipe, 4, torch.float32, torch.device("cpu"))
    expected = extract.embed_views(model, crops, *args[1:])

    wrapped = []
    from_numpy = torch.from_numpy

    def spy(array):
        wrapped.append(array.flags.writeable)
        return from_numpy(array)

    monkeypatch.setattr(torch, "from_numpy", spy)
    crops.setflags(write=False)
    got = extract.embed_views(model, crops, *args[1:])
    assert wrapped == [True]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_extract_worker_with_other_weights_is_refused(tmp_path):
    cfg = tiny_config("digits", tmp_path / "f.zarr")
    sha = load_backbone("tiny")[1]
    with pytest.raises(WeightsError, match=rf"sha256 {sha[:12]}, driver 000000000000; --weights"):
        extract.ShardEmbedder(cfg, "0" * 64)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels (its data is never decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_image_over_the_pixel_limit_is_an_invalid_image(tmp_path, monkeypatch):
    """Refused before decoding, so never in RAM (PIL's own bomb check is off here, as a caller
    who raised `Image.MAX_IMAGE_PIXELS` would have it)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    (tmp_path / "big.png").write_bytes(png_header(16_385, 16_384))
    decoded = extract.decode_shard(
        "folder", str(tmp_path), ["big.png"], Shard(0, 0, 1), ViewRecipe()
    )
    assert not decoded.valid.any() and len(decoded.crops) == 0
    limit = preprocess.MAX_PIXELS
    assert decoded.errors == {
        0: f"ValueError: image of 16385x16384 pixels exceeds the {limit} limit"
    }


def test_random_crop_that_never_fits_is_the_whole_square():
    """Ten draws of boxes larger than the square fall back to all of it, as torchvision does."""
    from torchvision.transforms import RandomResizedCrop

    recipe = ViewRecipe(rrc_scale=(1.0, 1.0), rrc_ratio=(0.5, 2.0))  # any ratio but 1 overflows
    box = _random_crop_box(np.random.default_rng(0), 256, recipe)
    square = torch.zeros(3, 256, 256)
    assert box == (0, 0, 256, 256) == RandomResizedCrop.get_params(square, [1.0, 1.0], [0.5, 2.0])


def test_manifest_with_negative_labels_is_refused(tmp_path):
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg"], "label": [0, -1]}), manifest)
    with pytest.raises(InputError, match=r"has negative labels; labels must be 0..K-1$"):
        open_source(str(manifest))
