"""`flatdino eval fid`: the Fréchet distance's closed form, precision/recall, the sets it reads,
and a clear error (not a download) without the Inception weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flatdino.cli.main import app
from flatdino.eval.fid import (
    frechet_distance,
    inception_model,
    load_set,
    precision_recall,
    statistics,
)
from flatdino.eval.knn import pooled
from flatdino.pipeline.errors import WeightsError
from flatdino.pipeline.preprocess import adm_center_crop, to_rgb
from flatdino.pipeline.sources import load_image, open_source


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance((mu1, np.diag(a)), (mu2, np.diag(b))) == pytest.approx(closed, rel=1e-6)
    x = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(frechet_distance(statistics(x), statistics(x))) < 1e-6


def test_precision_recall_of_same_and_disjoint_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 4))
    same = precision_recall(real, real.copy())
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    far = precision_recall(real, rng.normal(size=(200, 4)) + 100.0)
    assert far["precision"] == 0.0 and far["recall"] == 0.0


def test_images_pass_through_the_same_view_0_as_extract_features(digits_val_store, tmp_path):
    source = open_source("digits", "val")
    crops = []
    for path in source.paths[:12]:
        with load_image("digits", "", path) as img:
            crops.append(adm_center_crop(to_rgb(img), 256))
    np.savez(tmp_path / "samples.npz", arr_0=np.stack(crops), labels=np.zeros(12))
    vectors, _ = load_set(str(tmp_path / "samples.npz"), "dinov2", backbone="tiny")
    stored = pooled(str(digits_val_store))[0][:12]
    np.testing.assert_allclose(vectors, stored, atol=2e-2)  # the store keeps float16


def test_missing_inception_weights_are_an_error_not_a_download(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))  # an empty cache
    try:
        with pytest.raises(WeightsError, match="--inception-weights"):
            inception_model(None)
    finally:
        torch.hub.set_dir(old)


def test_command_on_stores_and_saved_statistics(digits_val_store, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "fid", "--real", str(digits_val_store), "--fake", str(digits_val_store),
                                 "--space", "dinov2", "--save-stats", str(tmp_path / "ref.npz"),
                                 "--precision-recall", "--out", str(tmp_path / "fd.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    fd = json.loads((tmp_path / "fd.json").read_text())
    assert abs(fd["fd"]) < 1e-6 and fd["precision"] == 1.0 and fd["recall"] == 1.0
    again = runner.invoke(app, ["eval", "fid", "--real", str(tmp_path / "ref.npz"), "--fake",
                                str(digits_val_store), "--space", "dinov2"])  # fmt: skip
    assert again.exit_code == 0 and "fd=" in again.output
    assert abs(float(again.output.split("fd=")[1].split()[0])) < 1e-4


def test_rfid_command_separates_the_vaes_cost(digits_val_store, tmp_path):
    from flatdino.models.pixel_decoder import PixelDecoder, pixel_decoder_preset
    from flatdino.trainers.runner import Dist, save_checkpoint
    from flatdino.trainers.train_vae import TrainVAEConfig, train_vae

    train_vae(TrainVAEConfig(features=str(digits_val_store), out=str(tmp_path / "vae"), preset="tiny",
                             steps=2, batch_size=16, num_workers=0, progress=False))  # fmt: skip
    cfg = pixel_decoder_preset("tiny", in_dim=64)
    save_checkpoint(tmp_path / "dec", PixelDecoder(cfg), cfg.to_dict(), None, Dist())
    result = CliRunner().invoke(app, ["eval", "rfid", "--features", str(digits_val_store), "--vae", str(tmp_path / "vae"),
                                      "--decoder", str(tmp_path / "dec"), "--space", "dinov2", "--backbone", "tiny",
                                      "--images", "12", "--out", str(tmp_path / "r.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["images"] == 12 and all(np.isfinite(r[k]) and r[k] >= -1e-6 for k in
                                     ("rfid", "rfid_decoder_only", "fd_vae_vs_decoder_only"))  # fmt: skip
