"""Features in 8 bits (`extract-features --feature-dtype int8`): the error bound of the codes, the
store's layout and size, the readers (loader, train-vae, encode-latents, k-NN) and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import tiny_config
from flatdino.cli.main import app
from flatdino.eval.knn import pooled
from flatdino.pipeline.encode import EncodeConfig, encode_latents
from flatdino.pipeline.errors import StoreMismatchError
from flatdino.pipeline.extract import extract_features
from flatdino.pipeline.feature_store import FeatureStore, object_count
from flatdino.pipeline.latent_store import LatentStore
from flatdino.pipeline.loader import RING, FeatureBatches, LoaderConfig
from flatdino.pipeline.quantise import dequantise, quantise, to_device
from flatdino.trainers.train_vae import TrainVAEConfig, train_vae

FIXTURE2 = Path(__file__).parent / "fixtures" / "format-v2"


@given(
    seed=st.integers(0, 2**31),
    log_scale=st.floats(-2, 3),
    outlier=st.floats(1, 100),
)
@settings(max_examples=60, deadline=None)
def test_round_trip_error_is_at_most_half_a_step_per_vector(seed, log_scale, outlier):
    """Every element within half of its vector's step (max|x| / 127, its float16 scale) of x.
    Vectors of max|x| >= 7.8e-3 (a scale in float16's normal range; the backbone's LayerNorm
    gives every patch vector unit RMS, so max|x| >= 1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 5, 96)).astype(np.float32) * np.float32(10.0**log_scale)
    x[0, 0, 7] *= outlier  # one large channel: the vector's step grows with it
    x[2, 4] = 0  # a failed image's row: all zeros
    codes, scales = quantise(x)
    assert codes.dtype == np.int8 and scales.dtype == np.float16 and scales.shape == (3, 5)
    assert np.abs(codes.astype(int)).max() <= 127
    err = np.abs(dequantise((codes, scales)) - x).max(-1)  # (3, 5)
    absmax = np.abs(x).max(-1)
    assert (err <= absmax / 254 * (1 + 2**-10)).all()  # float16 rounding of the scale: 2^-11
    assert (dequantise((codes, scales))[2, 4] == 0).all()
    torch_values = dequantise((torch.from_numpy(codes), torch.from_numpy(scales)))
    np.testing.assert_array_equal(torch_values.numpy(), dequantise((codes, scales)))


@pytest.fixture(scope="module")
def int8_store(digits_val_store, tmp_path_factory) -> Path:
    """The digits val split as `digits_val_store`, stored in 8 bits."""
    out = tmp_path_factory.mktemp("int8") / "digits-val-int8.zarr"
    extract_features(tiny_config("digits", out, split="val", feature_dtype="int8"))
    return out


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_int8_store_layout_attrs_size_and_values(int8_store, digits_val_store):
    store, ref = FeatureStore(int8_store), FeatureStore(digits_val_store)
    codes, scales = store.array("features"), store.array("feature_scales")
    assert codes.dtype == np.int8 and scales.dtype == np.float16
    assert scales.shape == (359, 2, 256) and scales.shards == (16, 2, 256)
    assert store.attrs["format_version"] == 4 and store.feature_dtype == "int8"  # 4: CLS kept
    assert store.attrs["fingerprint"]["feature_dtype"] == "int8"
    assert "feature_dtype" not in ref.attrs["fingerprint"] and ref.feature_dtype == "float16"
    assert store.attrs["complete"] and store.num_images == 359
    # bytes per row-view: P*C codes + P float16 scales against 2*P*C (C = 64 here, 768 for ViT-B)
    stored = _bytes(int8_store / "features") + _bytes(int8_store / "feature_scales")
    ratio = stored / _bytes(digits_val_store / "features")
    assert abs(ratio - (64 + 2) / 128) < 0.003, ratio
    files = sum(1 for f in int8_store.rglob("*") if f.is_file() and ".lock" not in f.name)
    assert files == object_count(359, 16, int8=True)
    x, y = ref.features[:].astype(np.float32), store.features[:]  # y: float32, dequantised
    assert y.dtype == np.float32 and y.shape == x.shape
    bound = np.abs(x).max(-1) / 254 * (1 + 2**-10) + np.abs(x).max(-1) * 2**-11  # + fp16 of x
    assert (np.abs(y - x).max(-1) <= bound).all()
    assert np.linalg.norm(y - x) / np.linalg.norm(x) < 0.01


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_ships_codes_and_the_device_dequantises(int8_store, workers):
    """Codes and scales, as stored, for every row; all batches kept (more than the loader's
    batch buffers: the later ones in replaced buffers, codes and scales alike)."""
    store = FeatureStore(int8_store)
    batches = FeatureBatches(store, LoaderConfig(batch_size=20, seed=3, num_workers=workers))
    views = batches.views(0)
    seen = 0
    for x, labels, rows in list(batches.epoch(0)):
        codes, scales = x
        assert codes.dtype == torch.int8 and scales.dtype == torch.float16
        assert codes.shape == (len(rows), 256, 64) and scales.shape == (len(rows), 256)
        got = to_device(x, torch.device("cpu"))
        want = np.stack([store.features[int(r), int(views[r])] for r in rows])
        np.testing.assert_array_equal(got.numpy(), want)
        assert torch.equal(labels, torch.from_numpy(store.labels()[rows]))
        seen += len(rows)
    assert seen == 359
    assert batches._idle[0].ring.replaced >= -(-359 // 20) - RING


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_a_rank_with_fewer_rows_ends_on_an_empty_batch_of_its_dtype(
    dtype, digits_val_store, request
):
    """359 rows in 23 blocks of 16, two ranks: one holds 12 blocks (> 180 rows), the other 11
    (< 180), so at batch 180 both run 2 steps and the second rank's last batch is empty, typed
    and shaped as a full one (the trainer's collectives and dequantisation take it unchanged)."""
    path = digits_val_store if dtype == "float16" else request.getfixturevalue("int8_store")
    store = FeatureStore(path)
    epochs = [
        list(
            FeatureBatches(store, LoaderConfig(180, seed=1, num_workers=0, rank=r, world=2)).epoch(
                0
            )
        )
        for r in range(2)
    ]
    assert [len(e) for e in epochs] == [2, 2]
    sizes = sorted([len(rows) for _, _, rows in e] for e in epochs)
    assert sizes[0][1] == 0 and sum(map(sum, sizes)) == 359
    empty = next(x for e in epochs for x, _, rows in e if len(rows) == 0)
    full = epochs[0][0][0]
    parts, want = (empty, full) if dtype == "int8" else ((empty,), (full,))
    for got, ref in zip(parts, want, strict=True):
        assert got.dtype == ref.dtype and got.shape == (0, *ref.shape[1:])
    assert to_device(empty, torch.device("cpu")).shape == (0, 256, 64)


def test_train_vae_encode_latents_and_knn_read_int8(int8_store, digits_val_store, tmp_path):
    run = tmp_path / "vae"
    metrics = train_vae(
        TrainVAEConfig(
            features=str(int8_store),
            val_features=str(int8_store),
            out=str(run),
            preset="tiny",
            steps=3,
            batch_size=32,
            num_workers=0,
            eval_every=3,
            device="cpu",
            progress=False,
        )
    )
    assert metrics["step"] == 3 and np.isfinite(metrics["val_rel_err"])
    mus = []
    for name, features in (("int8", int8_store), ("f16", digits_val_store)):
        out = tmp_path / f"latents-{name}.zarr"
        encode_latents(
            EncodeConfig(
                features=str(features),
                vae=str(run),
                out=str(out),
                batch_size=100,  # not a multiple of the rows: a batch spans images
                backend="local",
                device="cpu",
                progress=False,
            )
        )
        mus.append(LatentStore(out).array("mu")[:])
    assert mus[0].shape == (359, 2, 8, 16) and np.isfinite(mus[0]).all()
    assert np.linalg.norm(mus[0] - mus[1]) / np.linalg.norm(mus[1]) < 0.02
    vectors, labels = pooled(str(int8_store))
    reference, ref_labels = pooled(str(digits_val_store))
    assert np.array_equal(labels, ref_labels)
    np.testing.assert_allclose(vectors, reference, atol=2e-3)


def test_resuming_with_the_other_feature_dtype_is_refused(int8_store, digits_val_store):
    for path, asked in ((int8_store, "float16"), (digits_val_store, "int8")):
        cfg = tiny_config("digits", path, split="val", feature_dtype=asked)
        with pytest.raises(StoreMismatchError, match="feature_dtype.*--overwrite"):
            extract_features(cfg)
    again = extract_features(tiny_config("digits", int8_store, split="val", feature_dtype="int8"))
    assert again.shards_run == 0  # the same dtype resumes (nothing left to do)


def test_float16_stores_keep_their_fingerprint_and_format(digits_val_store):
    """A float16 store is written as before but for the CLS token (format 4, its one new
    fingerprint key; --no-cls writes format 2 exactly, test_cls.py); old stores read as before."""
    old = FeatureStore.open_complete(str(FIXTURE2 / "features.zarr"), "--features")
    assert old.feature_dtype == "float16" and old.features.dtype == np.float16
    drawn = old.read_drawn(0, 4, np.arange(4), np.zeros(4, int))
    assert isinstance(drawn, np.ndarray) and drawn.dtype == np.float16
    np.testing.assert_array_equal(drawn, old.array("features")[0:4, 0])
    store = FeatureStore(digits_val_store)  # written by this version, float16 by default
    assert store.attrs["format_version"] == 4 and "feature_dtype" not in store.attrs
    assert set(store.attrs["fingerprint"]) - set(old.attrs["fingerprint"]) == {"cls_token"}
    assert not store.has("feature_scales")


def test_the_cli_passes_feature_dtype(tmp_path, monkeypatch):
    from flatdino.pipeline import extract

    seen = {}

    def fake(cfg):
        seen["cfg"] = cfg
        return extract.ExtractSummary(cfg.out, 10, 1, 1, images_run=10)

    monkeypatch.setattr(extract, "extract_features", fake)
    args = ["extract-features", "--data", "digits", "--out", str(tmp_path / "s")]
    result = CliRunner().invoke(app, [*args, "--feature-dtype", "int8"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].feature_dtype == "int8"
    assert CliRunner().invoke(app, [*args, "--feature-dtype", "int4"]).exit_code != 0
