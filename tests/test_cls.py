"""The DINOv2 CLS token's data path (issue 27): extract-features keeps each view's CLS token in the
feature store (format 4), encode-latents carries it into the latents store, LatentBatches hands it
to the trainer with `cls=True`; stores without it still open and refuse `cls` in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import assert_same_store, fake_latents_store, tiny_config
from flatdino.cli.main import app
from flatdino.pipeline.backbone import load_backbone
from flatdino.pipeline.encode import EncodeConfig, encode_latents
from flatdino.pipeline.errors import InputError, StoreMismatchError
from flatdino.pipeline.extract import extract_features
from flatdino.pipeline.feature_store import FeatureStore, object_count
from flatdino.pipeline.latent_store import LatentStore
from flatdino.pipeline.loader import LatentBatches, LoaderConfig
from flatdino.pipeline.preprocess import ViewRecipe, adm_center_crop, make_views, to_rgb
from flatdino.pipeline.sources import load_image, open_source

FIXTURE2 = Path(__file__).parent / "fixtures" / "format-v2"  # written before the CLS token


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Six small real photos in two classes (scikit-image's samples, downscaled)."""
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    names = ("astronaut", "coffee", "chelsea", "rocket", "camera", "moon")
    for i, name in enumerate(names):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(getattr(data, name)()).resize((96, 80)).save(root / f"c{i % 2}/{name}.png")
    return root


@pytest.fixture(scope="module")
def stores(folder, tmp_path_factory) -> dict[str, Path]:
    """The folder extracted with the CLS token (the default), without it, and in int8."""
    out = tmp_path_factory.mktemp("stores")
    settings = {"cls": {}, "nocls": {"cls_token": False}, "int8": {"feature_dtype": "int8"}}
    for name, kw in settings.items():
        extract_features(tiny_config(str(folder), out / f"{name}.zarr", shard_size=8, **kw))
    return {name: out / f"{name}.zarr" for name in settings}


def test_the_stored_cls_token_is_the_backbones(stores, folder):
    store = FeatureStore(stores["cls"])
    assert store.has_cls and store.attrs["format_version"] == 4
    assert store.attrs["fingerprint"]["cls_token"] is True
    cls = store.read_cls(0, store.num_images)
    assert cls.dtype == np.float16 and cls.shape == (6, 2, 64)
    model, _ = load_backbone("tiny")
    src = open_source(str(folder), "all")
    norm = model.vit.norm  # untrained: weight 1, bias 0, so timm's own forward is a reference
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    for index in (0, 5):
        crop = adm_center_crop(to_rgb(load_image(src.kind, src.root, src.paths[index])), 256)
        with torch.no_grad():
            views = make_views(crop, index, ViewRecipe(views=2))  # (V, 3, 224, 224)
            patches, token = model.tokens(views)  # (V, P, C), (V, C)
            assert torch.equal(patches, model(views))  # the forward's patches, bit for bit
            reference = model.vit.forward_features(views)[:, 0].numpy()  # (V, C): CLS, index 0
        # the random backbone's CLS is ~1e-3 (its token starts at 1e-6 and LayerScale at 1e-5):
        # compare against the vector's scale, float16's ~1e-3 relative rounding and batch shapes
        np.testing.assert_allclose(token.numpy(), reference, rtol=1e-4, atol=1e-9)
        scale = np.abs(reference).max()
        np.testing.assert_allclose(cls[index], reference, rtol=0, atol=5e-3 * scale)
        c0, c1 = cls[index].astype(np.float32)
        assert np.linalg.norm(c0 - c1) > 3e-3 * np.linalg.norm(c0)  # each view's own token
    # int8 stores keep it in float16, the same values; --no-cls stores are format 2 as before
    int8 = FeatureStore(stores["int8"])
    assert int8.attrs["format_version"] == 4 and int8.feature_dtype == "int8"
    np.testing.assert_array_equal(int8.read_cls(0, 6), cls)
    plain = FeatureStore(stores["nocls"])
    assert not plain.has_cls and plain.attrs["format_version"] == 2 and not plain.has("cls")
    assert "cls_token" not in plain.attrs["fingerprint"]
    np.testing.assert_array_equal(plain.array("features")[:], store.array("features")[:])


@pytest.mark.parametrize("feature_dtype", ["float16", "int8"])
def test_a_shard_round_trips_the_cls_token(tmp_path, feature_dtype):
    n, v, c = 20, 2, 16
    rng = np.random.default_rng(0)
    store = FeatureStore.create(
        tmp_path / "f.zarr",
        shape=(n, v, 256, c),
        labels=np.zeros(n, np.int32),
        paths=[str(i) for i in range(n)],
        class_names=["a"],
        shard_size=8,
        chunk_rows=1,
        attrs={"fingerprint": {}},
        feature_dtype=feature_dtype,
        cls_token=True,
    )
    cls = rng.standard_normal((n, v, c)).astype(np.float16)
    for s in store.shards():
        feats = rng.standard_normal((s.stop - s.start, v, 256, c)).astype(np.float16)
        store.write_shard(s, feats, np.ones(s.stop - s.start, bool), {}, cls=cls[s.start : s.stop])
    store.finalize()
    again = FeatureStore(tmp_path / "f.zarr")
    assert again.has_cls and again.array("cls").dtype == np.float16
    np.testing.assert_array_equal(again.read_cls(0, n), cls)
    np.testing.assert_array_equal(again.read_cls(8, 16), cls[8:16])
    files = [f for f in (tmp_path / "f.zarr").rglob("*") if f.is_file()]
    assert len(files) == object_count(n, 8, int8=feature_dtype == "int8")  # 1 cls object a shard
    assert "cls" in again.summary()["arrays"]
    with pytest.raises(AssertionError, match="CLS tokens given iff"):
        again.write_shard(again.shards()[-1], feats, np.ones(4, bool), {})  # no cls: refused


@pytest.mark.parametrize("name", ["cls", "int8"])
def test_encode_latents_carries_the_cls_token(stores, tmp_path, name):
    out = tmp_path / "latents.zarr"
    encode_latents(
        EncodeConfig(
            features=str(stores[name]),
            vae=str(FIXTURE2 / "vae"),  # a tiny VAE of the tiny backbone's (256, 64) features
            out=str(out),
            batch_size=5,
            backend="local",
            device="cpu",
            progress=False,
        )
    )
    latents, features = LatentStore(out), FeatureStore(stores[name])
    assert latents.has_cls and latents.array("cls").dtype == np.float16
    np.testing.assert_array_equal(latents.array("cls")[:], features.read_cls(0, 6))
    latents.require_cls()  # no error
    assert latents.attrs["fingerprint"]["features_fingerprint"]["cls_token"] is True


def test_encode_latents_of_a_store_without_it_writes_none(stores, tmp_path):
    out = tmp_path / "latents.zarr"
    cfg = EncodeConfig(
        features=str(stores["nocls"]),
        vae=str(FIXTURE2 / "vae"),
        out=str(out),
        backend="local",
        device="cpu",
        progress=False,
    )
    encode_latents(cfg)
    assert not LatentStore(out).has_cls and LatentStore(out).attrs["complete"]


def _identity_store(path: Path, n: int = 40, v: int = 3, cls_dim: int = 6) -> Path:
    """Latents whose values name their (row, view): mu[r, w] = r + w/10, cls[r, w] = -(r + w/10)."""
    tag = (np.arange(n)[:, None] + np.arange(v)[None, :] / 10).astype(np.float32)  # (N, V)
    mu = np.broadcast_to(tag[:, :, None, None], (n, v, 4, 2)).copy()
    cls = np.broadcast_to(-tag[:, :, None], (n, v, cls_dim)).astype(np.float16)
    valid = np.ones(n, bool)
    valid[[3, 17]] = False
    return fake_latents_store(path, mu, np.arange(n) % 4, valid, shard_size=8, cls=cls)


@pytest.mark.parametrize("rank", [0, 1])
def test_latent_batches_with_cls_yield_the_same_rows_and_views(tmp_path, rank):
    store = LatentStore(_identity_store(tmp_path / "l.zarr"))
    cfg = LoaderConfig(batch_size=6, seed=4, rank=rank, world=2)
    plain, with_cls = LatentBatches(store, cfg), LatentBatches(store, cfg, cls=True)
    assert plain.cls is None and with_cls.cls.shape == (19, 3, 6)
    for epoch in (0, 1):
        batches = list(with_cls.epoch(epoch, start_step=1))
        assert len(batches) == with_cls.steps_per_epoch() - 1 == 2
        for (x, y), (x2, y2, c) in zip(plain.epoch(epoch, 1), batches, strict=True):
            assert torch.equal(x, x2) and torch.equal(y, y2)  # the draws are unchanged
            assert c.dtype == torch.float32 and c.shape == (6, 6)
            torch.testing.assert_close(c, -x[:, :1, 0].expand(6, 6), atol=0.02, rtol=0)


def test_stores_from_before_the_cls_token_open_and_refuse_cls_in_one_line(tmp_path):
    old = FeatureStore.open_complete(str(FIXTURE2 / "features.zarr"), "--features")
    assert not old.has_cls and old.read_shard(old.shards()[0])[0].shape == (8, 1, 256, 64)
    latents = LatentStore.open_complete(str(FIXTURE2 / "latents.zarr"), "--latents")
    assert not latents.has_cls
    assert LatentBatches(latents, LoaderConfig(4)).steps_per_epoch() == 4  # read as before
    with pytest.raises(InputError) as e:
        LatentBatches(latents, LoaderConfig(4), cls=True)
    message = str(e.value)
    assert "\n" not in message and str(FIXTURE2 / "latents.zarr") in message
    assert "holds no DINOv2 CLS token" in message and "`flatdino extract-features`" in message
    assert "encode-latents" in message


def test_resuming_into_a_store_of_the_other_kind_is_one_line(stores, folder, tmp_path):
    for name, cls_token in (("cls", False), ("nocls", True), ("int8", False)):
        kw = {"feature_dtype": "int8"} if name == "int8" else {}
        cfg = tiny_config(str(folder), stores[name], shard_size=8, cls_token=cls_token, **kw)
        with pytest.raises(StoreMismatchError) as e:
            extract_features(cfg)
        assert "\n" not in str(e.value)
        assert "cls_token" in str(e.value) and "set --cls/--no-cls as the store was made" in str(
            e.value
        )
    # an unfinished store from before format 4 resumes with --no-cls: copy one, forget a shard
    unfinished = tmp_path / "old.zarr"
    shutil.copytree(stores["nocls"], unfinished)
    store = FeatureStore(unfinished, mode="r+")
    store.array("done")[0] = False
    store.group.attrs.update({"complete": False})
    again = extract_features(tiny_config(str(folder), unfinished, shard_size=8, cls_token=False))
    assert again.shards_run == 1
    assert_same_store(unfinished, stores["nocls"])


def test_the_cli_passes_no_cls(tmp_path, monkeypatch):
    from flatdino.pipeline import extract

    seen = []
    monkeypatch.setattr(
        extract,
        "extract_features",
        lambda cfg: seen.append(cfg) or extract.ExtractSummary(cfg.out, 1, 1, 1),
    )
    args = ["extract-features", "--data", "digits", "--out", str(tmp_path / "s")]
    for extra in ([], ["--no-cls"], ["--cls"]):
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
    assert [cfg.cls_token for cfg in seen] == [True, False, True]
