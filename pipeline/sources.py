"""Image sources: an ImageFolder directory, a Parquet manifest, or the built-in `digits` set.

A source is resolved once, in the driver, into an ordered list of records; the order is the store's
row order, so it is deterministic: sorted class folder, then sorted relative file name (folders),
the manifest's row order (manifests), scikit-learn's order within a seeded split (digits).
Workers never see the whole source: they get `(kind, root, paths)` for their own rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from .errors import InputError

# The extensions torchvision's ImageFolder accepts; other files in class folders are skipped.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("all", "train", "val")
DIGITS_SPLIT_SEED = 0  # fixed: the train/val split of `digits` must never change between runs
DIGITS_TRAIN_FRACTION = 0.8


@dataclass(frozen=True)
class ImageSource:
    """An ordered, labelled list of images; `paths[i]` is relative to `root` unless absolute."""

    kind: str  # "folder" | "manifest" | "digits"
    root: str  # folder or manifest directory; "" for digits
    split: str  # recorded in the store; selects rows only for digits
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]  # class_names[label]
    skipped_files: int = 0  # files without an image extension (folders only)

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """sha256 of the kind, split and (path, label) rows: a resume against other input refuses."""
        h = hashlib.sha256(json.dumps([self.kind, self.split, self.class_names]).encode())
        for path, label in zip(self.paths, self.labels, strict=True):
            h.update(f"{path}\t{label}\n".encode())
        return h.hexdigest()


def open_source(data: str, split: str = "all") -> ImageSource:
    """Resolve `--data` (a directory, a `.parquet` manifest or `digits`) into an ImageSource."""
    if split not in SPLITS:
        raise InputError(f"--split must be one of {', '.join(SPLITS)}; got {split!r}")
    if data == "digits":
        source = _digits_source(split)
    else:
        path = Path(data)
        if not path.exists():
            raise InputError(
                f"input {data!r} does not exist; pass an ImageFolder directory, a Parquet manifest "
                "or the built-in set with --data digits"
            )
        if path.is_dir():
            source = _folder_source(path, split)
        elif path.suffix == ".parquet":
            source = _manifest_source(path, split)
        else:
            raise InputError(
                f"input {data!r} is a file but not a .parquet manifest; pass a directory of class "
                "folders, a manifest with 'path' and 'label' columns, or --data digits"
            )
    if len(source) == 0:
        raise InputError(
            f"input {data!r} holds no images (extensions: {' '.join(IMAGE_EXTENSIONS)})"
        )
    return source


def _folder_source(root: Path, split: str) -> ImageSource:
    class_dirs = sorted(
        e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
    )
    if not class_dirs:
        raise InputError(
            f"directory {str(root)!r} has no class sub-folders; expected the ImageFolder layout "
            "ROOT/CLASS/IMAGE (or pass a Parquet manifest)"
        )
    paths, labels, skipped = [], [], 0
    for label, name in enumerate(class_dirs):
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            for fname in sorted(filenames):
                rel = os.path.relpath(os.path.join(dirpath, fname), root)
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(rel)
                    labels.append(label)
                else:
                    skipped += 1
    return ImageSource(
        "folder",
        str(root.resolve()),
        split,
        tuple(paths),
        tuple(labels),
        tuple(class_dirs),
        skipped,
    )


def _manifest_source(path: Path, split: str) -> ImageSource:
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise InputError(f"cannot read Parquet manifest {str(path)!r}: {e}") from e
    missing = {"path", "label"} - set(table.column_names)
    if missing:
        raise InputError(
            f"manifest {str(path)!r} lacks column(s) {sorted(missing)}; "
            f"expected 'path' and 'label' (found {table.column_names})"
        )
    paths = [str(p) for p in table.column("path").to_pylist()]
    labels = [int(v) for v in table.column("label").to_pylist()]
    if any(v < 0 for v in labels):
        raise InputError(f"manifest {str(path)!r} has negative labels; labels must be 0..K-1")
    num_classes = max(labels, default=-1) + 1
    names = [str(i) for i in range(num_classes)]
    if "class_name" in table.column_names:
        for label, name in zip(labels, table.column("class_name").to_pylist(), strict=True):
            names[label] = str(name)
    root = str(path.resolve().parent)
    return ImageSource("manifest", root, split, tuple(paths), tuple(labels), tuple(names))


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # ships its data: works offline

    digits = load_digits()
    return digits.images, digits.target


def _digits_rows(split: str) -> np.ndarray:
    """Indices of one split of scikit-learn's digits: a fixed, seeded 80/20 split."""
    n = len(_digits_arrays()[1])
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(n)
    n_train = int(round(DIGITS_TRAIN_FRACTION * n))
    rows = {"all": np.arange(n), "train": np.sort(order[:n_train]), "val": np.sort(order[n_train:])}
    return rows[split]


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 64) pixel values 0..16 and (N,) labels of one digits split, as scikit-learn ships them."""
    images, target = _digits_arrays()
    idx = _digits_rows(split)
    return images[idx].reshape(len(idx), 64), target[idx]


def _digits_source(split: str) -> ImageSource:
    _, target = _digits_arrays()
    idx = _digits_rows(split)
    return ImageSource(
        "digits",
        "",
        split,
        tuple(f"digits/{i:04d}" for i in idx),
        tuple(int(target[i]) for i in idx),
        tuple(str(d) for d in range(10)),
    )


def load_image(kind: str, root: str, path: str) -> Image.Image:
    """Open one image of a source (not yet decoded: PIL decodes lazily on `load()`)."""
    if kind == "digits":
        images, _ = _digits_arrays()
        gray = np.rint(images[int(path.rsplit("/", 1)[1])] * (255.0 / 16.0)).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")  # (8, 8, 3)
    return Image.open(os.path.join(root, path))
