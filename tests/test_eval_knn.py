"""`flatdino eval knn`: weighted votes, separable vs shuffled labels, pooling, and the command."""

from __future__ import annotations

import json

import numpy as np
import zarr
from typer.testing import CliRunner

from conftest import fake_latents_store
from flatdino.cli.main import app
from flatdino.eval.knn import knn_classify, pooled


def gaussians(n: int, seed: int, spread: float = 0.3, classes: int = 4):
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(0).normal(size=(classes, 8, 16))  # shared by train and val
    labels = rng.integers(0, classes, n)
    mu = means[labels][:, None] + spread * rng.normal(size=(n, 2, 8, 16))
    return mu.astype(np.float32), labels


def test_temperature_weighting_beats_a_plain_majority():
    train = np.array([[1.0, 0.0], [0.5, 0.866], [0.5, -0.866]], np.float32)  # cos 1, 0.5, 0.5
    labels, val = np.array([0, 1, 1]), np.array([[1.0, 0.0]], np.float32)
    sharp = knn_classify(train, labels, val, np.array([0]), k=3, temperature=0.07)
    flat = knn_classify(train, labels, val, np.array([0]), k=3, temperature=100.0)
    assert sharp["top1"] == 1.0 and flat["top1"] == 0.0  # e^(1/T) vs 2·e^(0.5/T)
    assert flat["top5"] == 1.0


def test_separable_near_100_and_shuffled_near_chance(tmp_path):
    train = fake_latents_store(tmp_path / "t.zarr", *gaussians(400, 1))
    val = fake_latents_store(tmp_path / "v.zarr", *gaussians(200, 2))
    xt, yt = pooled(str(train))
    xv, yv = pooled(str(val))
    assert knn_classify(xt, yt, xv, yv)["top1"] > 0.99
    shuffled = knn_classify(xt, np.random.default_rng(3).permutation(yt), xv, yv)["top1"]
    assert 0.1 < shuffled < 0.45  # chance: 0.25


def test_pooling_is_the_view_0_mean_over_valid_rows(digits_val_store):
    x, y = pooled(str(digits_val_store))
    g = zarr.open_group(str(digits_val_store), mode="r")
    valid = g["valid"][:]
    expected = g["features"][:, 0].astype(np.float32).mean(1)[valid]
    np.testing.assert_allclose(x, expected, rtol=1e-5)
    assert np.array_equal(y, g["labels"][:][valid])


def test_command_writes_json(tmp_path):
    train = fake_latents_store(tmp_path / "t.zarr", *gaussians(100, 1))
    val = fake_latents_store(tmp_path / "v.zarr", *gaussians(50, 2))
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "knn",
            "--train",
            str(train),
            "--val",
            str(val),
            "--out",
            str(tmp_path / "knn.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "knn.json").read_text())[0]
    assert row["top1"] > 0.95 and row["kind"] == "flatdino.latents" and row["n_val"] == 50
    bad = CliRunner().invoke(app, ["eval", "knn", "--train", str(train)])
    assert bad.exit_code != 0
