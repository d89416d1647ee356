"""The sets `eval fid` reads, each into its statistics (`SetStats`): a folder of images (searched
recursively), a Parquet manifest, a samples.npz, a feature store (its images in the inception
space, its pooled view-0 features in the dinov2 space), a features.npy, or saved statistics.

Images are decoded by a thread pool a few batches ahead of the network; only running sums and the
precision/recall subset are kept, so memory stays bounded whatever the set's size. Unreadable
images are skipped and counted; more than `max_failed_fraction` of a set is an error.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from ..pipeline.errors import FlatDinoError
from ..pipeline.feature_store import FeatureStore
from ..pipeline.preprocess import ViewRecipe, adm_center_crop, to_rgb
from ..pipeline.sources import IMAGE_EXTENSIONS, load_image, open_source
from ..pipeline.store import store_kind
from .feature_net import CROP, FeatureNet
from .fid_stats import Accumulator, SetStats, npz_members, read_saved_stats

if TYPE_CHECKING:  # the stage's config; fid.py imports this module
    from .fid import FidConfig

log = logging.getLogger(__name__)


@dataclass
class _Reader:
    """Items of a set in order, each turned into a uint8 crop by `load` (raising when unreadable)."""

    items: list
    load: Callable[[object], np.ndarray]
    failures: list = field(default_factory=list)


def image_files(root: Path) -> list[str]:
    """Every image file under `root`, recursively (hidden folders skipped), in sorted order."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = os.stat(dirpath)
        if (here.st_dev, here.st_ino) in seen:  # a symlink back up the tree: walked already
            dirnames[:] = []
            continue
        seen.add((here.st_dev, here.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return found


def _crop_file(kind: str, root: str) -> Callable[[str], np.ndarray]:
    def load(path: str) -> np.ndarray:
        with load_image(kind, root, path) as img:
            return adm_center_crop(to_rgb(img), CROP)

    return load


def _read_npz(
    path: Path, cfg: FidConfig, net: Callable[[], FeatureNet], keep: int | None
) -> SetStats:
    """A samples.npz's arr_0 (uint8 N, H, W, 3), read `cfg.batch_size` rows at a time (never all);
    the network is built once the header has been checked."""
    with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
        shape, fortran, dtype = _npy_header(f)
        if fortran or dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
            raise FlatDinoError(
                f"{str(path)!r}: arr_0 must be uint8 (N, H, W, 3) images; found {dtype} {shape}"
            )
        row, step = int(np.prod(shape[1:])), cfg.batch_size
        blocks = (
            np.frombuffer(bytearray(f.read(min(step, shape[0] - lo) * row)), np.uint8).reshape(
                -1, *shape[1:]
            )
            for lo in range(0, shape[0], step)
        )
        return array_blocks(blocks, shape[0], net(), keep, str(path), cfg.progress, cfg.workers)


def array_blocks(
    blocks: Iterable[np.ndarray],
    n: int,
    model: FeatureNet,
    keep: int | None,
    path: str,
    progress: bool,
    workers: int = 4,
) -> SetStats:
    """Statistics of `n` uint8 images given in blocks, ADM-cropped to 256 where needed; the
    crops and network inputs are made by `workers` threads, a few blocks ahead."""
    acc = Accumulator(n, keep)

    def prepare(block: np.ndarray) -> list[torch.Tensor]:
        return [model.prepare(npz_crop(im)) for im in block]

    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = _bounded_map(pool, prepare, blocks, ahead=max(2, workers))
        for future in tqdm(
            futures, desc=f"fid {Path(path).name}", unit="batch", disable=not progress
        ):
            acc.add(model(future.result()))
    return acc.result(path, model.identity)


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy file open at its start."""
    if np.lib.format.read_magic(f) == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def npz_crop(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (CROP, CROP):
        return image
    return adm_center_crop(Image.fromarray(image), CROP)


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """pool.map that keeps at most `ahead` results waiting (pool.map runs ahead without bound)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


def _image_reader(p: Path, space: str) -> _Reader | None:
    """The images of a folder, manifest or (in the inception space) feature store; else None."""
    kind = store_kind(p) if p.is_dir() else None
    if kind == "flatdino.features" and space == "inception":
        store = FeatureStore.open_complete(
            str(p), "the set"
        )  # its valid rows' images, where extract-features read them
        source_kind = store.attrs.get("fingerprint", {}).get("input", {}).get("kind")
        all_paths = store.manifest().column("path").to_pylist()
        paths = [all_paths[int(i)] for i in store.valid_rows()]
        return _Reader(paths, _crop_file(source_kind, store.attrs.get("input_root", "")))
    if kind is not None:
        return None
    if p.is_dir():
        files = image_files(p)
        if not files:
            raise FlatDinoError(
                f"{str(p)!r} holds no images ({' '.join(IMAGE_EXTENSIONS)}), searched recursively"
            )
        return _Reader(files, _crop_file("folder", ""))
    if p.suffix == ".parquet":
        source = open_source(str(p))
        return _Reader(list(source.paths), _crop_file(source.kind, source.root))
    return None


def _check_failures(path: str, failures: list, total: int, cfg: FidConfig) -> None:
    if len(failures) > cfg.max_failed_fraction * total:
        item, error = failures[0]
        raise FlatDinoError(
            f"{path!r}: {len(failures)} of {total} images could not be read (first: {item}: "
            f"{error}), above --max-failed-fraction {cfg.max_failed_fraction}; fix or remove them, "
            "or raise --max-failed-fraction"
        )
    if failures:
        log.warning(
            "%s: skipped %d unreadable image(s) of %d (first: %s: %s)",
            path,
            len(failures),
            total,
            *failures[0],
        )


def load_set(path: str, cfg: FidConfig, net: Callable[[], FeatureNet] | None = None) -> SetStats:
    """The statistics of one set; `net()` gives the (shared, lazily built) feature network,
    by default one of `cfg`'s space."""
    net = net or (lambda: FeatureNet(cfg))
    p = Path(path)
    if not p.exists():
        raise FlatDinoError(f"{path!r} does not exist")
    keep = cfg.pr_samples if cfg.precision_recall else None
    if p.suffix == ".npz" and p.is_file():
        names = npz_members(p)
        if "mu.npy" in names:
            return read_saved_stats(p)
        if "arr_0.npy" not in names:
            raise FlatDinoError(
                f"{path!r} is neither a samples.npz (arr_0) nor saved statistics (mu, sigma)"
            )
        return _read_npz(p, cfg, net, keep)
    reader = _image_reader(p, cfg.space)
    if reader is not None:
        return _read_images(path, reader, cfg, net(), keep)
    kind = store_kind(p) if p.is_dir() else None
    if kind is not None or p.suffix == ".npy":
        if cfg.space != "dinov2":
            raise FlatDinoError(f"{path!r} holds features: compare it with --space dinov2")
        return _read_features(p, kind, cfg, keep)
    raise FlatDinoError(
        f"{path!r} is not an image folder, Parquet manifest, samples.npz, feature store, "
        "features.npy or statistics .npz"
    )


def _read_images(
    path: str, reader: _Reader, cfg: FidConfig, model: FeatureNet, keep: int | None
) -> SetStats:
    def load(item):
        try:
            return model.prepare(reader.load(item))
        except Exception as e:  # any decode error: skipped and counted, as extract-features
            reader.failures.append((item, f"{type(e).__name__}: {e}"))
            return None

    acc, batch = Accumulator(len(reader.items), keep), []
    with ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        futures = _bounded_map(pool, load, reader.items, ahead=2 * cfg.batch_size)
        for future in tqdm(
            futures,
            desc=f"fid {Path(path).name}",
            unit="img",
            total=len(reader.items),
            disable=not cfg.progress,
        ):
            crop = future.result()
            if crop is not None:
                batch.append(crop)
            if len(batch) == cfg.batch_size:
                acc.add(model(batch))
                batch = []
        if batch:
            acc.add(model(batch))
    _check_failures(path, reader.failures, len(reader.items), cfg)
    return acc.result(path, model.identity, len(reader.failures))


def _read_features(p: Path, kind: str | None, cfg: FidConfig, keep: int | None) -> SetStats:
    """A feature store's valid view-0 rows or a features.npy, mean-pooled block by block."""
    desc = f"fid {p.name}" if cfg.progress else None
    if kind is not None:
        if kind != "flatdino.features":
            raise FlatDinoError(f"{str(p)!r} is a {kind} store; FD needs a feature store")
        store = FeatureStore.open_complete(str(p), "the set")
        identity = _store_identity(store)
        total, blocks = int(store.valid_mask().sum()), store.pooled_view0(desc=desc)
    else:
        data = np.load(p, mmap_mode="r")  # (N, P, C) of `sample --save-features`
        if data.ndim != 3:
            raise FlatDinoError(f"{str(p)!r} holds {data.shape}; expected features (N, P, C)")
        identity = {
            "space": "dinov2",
            "network": None,
            "weights_sha256": None,
            "crop": None,
            "input_size": None,
            "antialias": None,
        }  # decoded by a VAE: the backbone is not recorded here
        starts = tqdm(range(0, len(data), 1024), desc=desc, disable=desc is None)
        total = len(data)
        blocks = (np.asarray(data[lo : lo + 1024], np.float32).mean(1) for lo in starts)
    acc = Accumulator(total, keep)
    for x in blocks:
        if len(x):
            acc.add(x)
    return acc.result(str(p), identity)


def _store_identity(store: FeatureStore) -> dict:
    """How a feature store's features were computed, in the fields two sides compare."""
    fp = store.attrs.get("fingerprint", {})
    recipe = fp.get("preprocessing", {})
    return {
        "space": "dinov2",
        "network": fp.get("backbone"),
        "weights_sha256": fp.get("weights_sha256"),
        "crop": recipe.get("crop_size"),
        "input_size": recipe.get("input_size"),
        "antialias": ViewRecipe.from_attrs(recipe).antialias,
    }
