"""Image sources: deterministic order, labels, the digits split, and clear input errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flatdino.pipeline.errors import InputError
from flatdino.pipeline.sources import load_image, open_source


def test_folder_order_labels_and_skipped_files(messy_folder):
    src = open_source(str(messy_folder))
    assert src.class_names == ("a_good", "b_odd", "c_empty")  # empty class keeps its label
    assert list(src.paths) == sorted(src.paths)  # sorted class, then sorted file
    assert src.paths[0] == "a_good/astronaut.jpg" and src.labels[0] == 0
    assert set(src.labels) == {0, 1}
    assert len(src) == 16 and src.skipped_files == 2  # notes.txt and .DS_Store
    assert open_source(str(messy_folder)).fingerprint() == src.fingerprint()


def test_manifest_source_resolves_relative_paths(messy_folder, tmp_path):
    table = pa.table(
        {
            "path": [str(messy_folder / "a_good/coffee.jpg"), "a_good/rocket.jpg"],
            "label": [3, 1],
            "class_name": ["cup", "launch"],
        }
    )
    manifest = messy_folder / "m.parquet"
    pq.write_table(table, manifest)
    src = open_source(str(manifest))
    assert src.labels == (3, 1) and src.class_names == ("0", "launch", "2", "cup")
    assert load_image(src.kind, src.root, src.paths[1]).size == (640, 427)
    manifest.unlink()


def test_digits_split_is_fixed_disjoint_and_complete():
    train, val, everything = (open_source("digits", s) for s in ("train", "val", "all"))
    assert (len(train), len(val), len(everything)) == (1438, 359, 1797)
    assert not set(train.paths) & set(val.paths)
    assert set(train.paths) | set(val.paths) == set(everything.paths)
    assert train.fingerprint() == open_source("digits", "train").fingerprint()
    assert train.fingerprint() != val.fingerprint()
    from sklearn.datasets import load_digits

    img = np.asarray(load_image("digits", "", everything.paths[5]))  # 0..16 grey -> 0..255 RGB
    expected = np.rint(load_digits().images[5] * 255 / 16).astype(np.uint8)
    assert img.shape == (8, 8, 3) and (img == expected[:, :, None]).all()
    assert everything.labels[5] == load_digits().target[5]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: str(p / "missing"), "does not exist"),
        (lambda p: str(p), "no class sub-folders"),
        (lambda p: (p / "a").mkdir() or str(p), "holds no images"),
        (lambda p: (p / "x.csv").write_text("a") and str(p / "x.csv"), "not a .parquet"),
        (
            lambda p: (
                pq.write_table(pa.table({"file": ["a"]}), p / "m.parquet") or str(p / "m.parquet")
            ),
            "lacks column",
        ),
        (
            lambda p: (p / "bad.parquet").write_text("nope") and str(p / "bad.parquet"),
            "cannot read",
        ),
    ],
)
def test_bad_inputs_are_one_clear_error(make, match, tmp_path):
    with pytest.raises(InputError, match=match):
        open_source(make(tmp_path))


def test_unknown_split_is_refused():
    with pytest.raises(InputError, match="--split"):
        open_source("digits", "test")
