"""`flatdino eval redundancy`: PCA rank, similarity against distance, and the command."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from flatdino.cli.main import app
from flatdino.eval.redundancy import pca_dims, similarity_by_distance


def test_pca_of_data_with_known_rank_gives_that_rank():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(50, 5)))[0].T  # 5 orthonormal directions in 50 dims
    x = rng.normal(size=(2000, 5)) @ basis + 3.0  # equal variance along each: 95% needs all 5
    assert pca_dims(x, 0.95) == 5
    assert pca_dims(x, 0.5) == 3  # 2 of 5 equal parts hold ~40%, 3 hold ~60%
    assert pca_dims(x + 1e-4 * rng.normal(size=x.shape), 0.95) == 5  # tiny noise changes nothing


def test_similarity_falls_with_distance_for_smooth_features():
    ys, xs = np.divmod(np.arange(256), 16)
    angle = np.pi * (ys + xs) / 30  # the feature direction turns slowly across the grid
    feats = np.stack([np.cos(angle), np.sin(angle)], -1)[None].repeat(3, 0)  # (3, 256, 2)
    distances, sim = similarity_by_distance(feats)
    assert distances[0] == 0 and sim[0] == np.float32(1.0)
    assert np.all(np.diff(sim[:8]) < 0)  # monotone over the near range


def test_command_writes_json_and_plot(digits_val_store, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "redundancy",
            "--features",
            str(digits_val_store),
            "--out",
            str(tmp_path),
            "--images",
            "16",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "redundancy.json").read_text())
    assert data["images"] == 16 and data["pixel_dims"] == 588 and data["feature_dims"] == 64
    assert 1 <= data["feature_pca_dims"] <= 64 and 1 <= data["pixel_pca_dims"] <= 588
    assert abs(data["cosine_similarity"][0] - 1) < 1e-5  # a patch with itself
    assert (tmp_path / "redundancy.png").stat().st_size > 10_000
