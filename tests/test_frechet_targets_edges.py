"""pipeline/frechet.py's refusals and its singular-product fix, and pipeline/targets.py's
one-line refusal of a store whose source images moved (and its empty tail batch)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from flatdino.pipeline.errors import FlatDinoError
from flatdino.pipeline.frechet import frechet_distance
from flatdino.pipeline.targets import TargetImages


def test_sets_of_different_feature_dims_are_refused():
    with pytest.raises(FlatDinoError, match="^the two sets have features of 2 and 3 dims;"):
        frechet_distance((np.zeros(2), np.eye(2)), (np.zeros(3), np.eye(3)))


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # scipy's, expected here
def test_a_singular_product_gets_eps_on_the_diagonals(caplog):
    nilpotent = np.array([[0.0, 1.0], [0.0, 0.0]])  # s1 @ s2 has no square root: sqrtm gives inf
    with caplog.at_level(logging.WARNING, "flatdino.pipeline.frechet"):
        d = frechet_distance((np.zeros(2), nilpotent), (np.zeros(2), np.eye(2)), eps=1e-6)
    assert "singular product of covariances; adding 1e-06 to the diagonals" in caplog.text
    # sqrt((s1 + eps I)(1 + eps) I) is upper triangular with sqrt(eps (1 + eps)) on its diagonal
    assert d == pytest.approx(2 - 4 * np.sqrt(1e-6 * (1 + 1e-6)), abs=1e-9)


def test_a_clearly_complex_square_root_is_refused():
    with pytest.raises(FlatDinoError, match=r"complex square root \(imaginary part 1\)"):
        frechet_distance((np.zeros(2), np.eye(2)), (np.zeros(2), -np.eye(2)))  # sqrt(-I) = iI


class FakeStore:
    """What TargetImages reads of a feature store: attrs, the manifest's paths, valid rows."""

    def __init__(self, root, paths):
        recipe = {"views": 1, "crop_size": 8, "input_size": 8}
        self.attrs = {
            "fingerprint": {"input": {"kind": "folder"}, "preprocessing": recipe},
            "input_root": str(root),
            "num_valid": len(paths),
        }
        self.paths, self.path = paths, "feats.zarr"

    def manifest(self):
        return pa.table({"path": self.paths})

    def valid_rows(self):
        return np.arange(len(self.paths))


def test_moved_source_images_are_refused_before_training(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    targets = TargetImages(FakeStore(tmp_path, ["a.png"]), threads=1)
    assert targets.batch(np.array([0]), np.array([0]))[0, 0].unique().tolist() == [1.0]  # red
    empty = targets.batch(np.array([], int), np.array([], int))
    assert empty.shape == (0, 3, 8, 8)
    (tmp_path / "a.png").rename(tmp_path / "moved.png")
    with pytest.raises(FlatDinoError, match=r"^cannot read the images of --features 'feats.zarr'"):
        TargetImages(FakeStore(tmp_path, ["a.png"]), threads=1)
