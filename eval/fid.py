"""`flatdino eval fid`: Fréchet distance, precision and recall between two sets (paper §4.3).

A set is any of: a folder of images (searched recursively: an ImageFolder tree or `sample`'s
images/, mixed sizes and formats), a Parquet manifest (`path`, `label`), a `samples.npz` (arr_0
uint8 N×H×W×3, the ADM evaluator's layout), a feature store, a `features.npy` (N, P, C) of
`sample --save-features`, or saved statistics (`.npz` with mu, sigma and how they were computed,
written by `--save-stats`). Every image gets the pipeline's ADM centre crop to 256 first.
Two feature spaces:
- `inception`: the 2048-d pool features of the standard FID network (pytorch-fid's InceptionV3,
  which resizes to 299 itself). Its weights file (pt_inception-2015-12-05-6726825d.pth) is taken
  from the torch hub cache or `--inception-weights PATH`; without it this is a clear error, never a
  download. A feature store in this space stands for the images it was extracted from.
- `dinov2`: FD-DINOv2 with the pipeline's own backbone: images become view-0 DINOv2 patch
  features (as extract-features computes them), mean-pooled over patches; stores and features.npy
  are pooled the same way.

Memory stays bounded whatever the set's size: images are decoded by a thread pool a few batches
ahead of the network, and only the running sums of x and x xᵀ (float64) are kept, so 50K samples
or ImageNet's 1.28M references work on a machine that cannot hold them. Precision and recall
(Kynkäänniemi et al. 2019, k = 3, as the ADM evaluator) need the vectors: a seeded subset of at
most `pr_samples` per side, with k-NN radii and coverage computed in row blocks, never an N×N
matrix. Unreadable images are skipped and counted; more than `max_failed_fraction` of a set is an
error, as in extract-features. Two sides computed differently (feature network, its weights, the
crop or input resolution) are refused, naming what differs.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..models.dinov2 import state_sha256
from ..pipeline.backbone import load_backbone
from ..pipeline.checkpoints import load_pixel_decoder, load_vae, resolve_vae
from ..pipeline.env import resolve_device
from ..pipeline.errors import FlatDinoError, WeightsError
from ..pipeline.feature_store import FeatureStore
from ..pipeline.frechet import RunningStats, frechet_distance, statistics  # noqa: F401  (eval fid's API)
from ..pipeline.preprocess import ViewRecipe, adm_center_crop, make_views, to_rgb
from ..pipeline.sources import IMAGE_EXTENSIONS, load_image, open_source
from ..pipeline.store import row_block, store_kind
from ..pipeline.targets import TargetImages

log = logging.getLogger(__name__)

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
CROP = 256  # the ADM centre crop every image set gets (the generated images' size)
IDENTITY_FIELDS = ("space", "network", "weights_sha256", "crop", "input_size", "antialias")


@dataclass(frozen=True)
class FidConfig:
    """Everything `fid` needs; the CLI only fills it in."""

    real: str  # reference set (see the module docstring for the kinds)
    fake: str | None = None  # the set to compare (None: only save --real's statistics)
    space: str = "inception"  # inception | dinov2
    backbone: str = "dinov2-vitb14-reg"  # the dinov2 space's network for images
    weights: str | None = None  # its local weights
    inception_weights: str | None = None  # local pt_inception-2015-12-05-6726825d.pth
    device: str = "auto"
    batch_size: int = 64  # images per forward pass of the feature network
    workers: int = 8  # threads decoding images
    max_failed_fraction: float = 0.01  # more unreadable images than this in a set is an error
    precision_recall: bool = False
    pr_samples: int = 50_000  # at most this many vectors per side for precision/recall
    k: int = 3  # neighbours of the k-NN radii
    save_stats: str | None = None  # write the reference's statistics here
    progress: bool = True


# -- precision and recall ------------------------------------------------------------------------


def _rows(n: int, m: int, budget: int) -> int:
    """Rows per block so that a block of distances (rows x m float32) fits in `budget` bytes."""
    return max(1, min(n, budget // (4 * max(1, m))))


@torch.no_grad()
def knn_radii(x: torch.Tensor, k: int, budget: int = 256 << 20) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest other row, one block of rows at a time."""
    step = _rows(len(x), len(x), budget)
    return torch.cat(
        [
            torch.cdist(x[i : i + step], x).kthvalue(k + 1, dim=1).values
            for i in range(0, len(x), step)
        ]
    )


@torch.no_grad()
def coverage(
    points: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, budget: int = 256 << 20
) -> float:
    """The fraction of `points` inside at least one k-NN ball of `ref`, block by block."""
    step = _rows(len(points), len(ref), budget)
    inside = [
        (torch.cdist(points[i : i + step], ref) <= radii[None]).any(1)
        for i in range(0, len(points), step)
    ]
    return torch.cat(inside).double().mean().item()


def precision_recall(
    real: np.ndarray, fake: np.ndarray, k: int = 3, device: str = "cpu", budget: int = 256 << 20
) -> dict[str, float]:
    """Kynkäänniemi et al.: a sample counts when it falls in the k-NN ball of a sample of the
    other set; precision for fake in real's manifold, recall for real in fake's. Distances in
    float32 blocks of at most `budget` bytes."""
    r = torch.as_tensor(np.asarray(real, np.float32), device=device)
    f = torch.as_tensor(np.asarray(fake, np.float32), device=device)
    return {
        "precision": coverage(f, r, knn_radii(r, k, budget), budget),
        "recall": coverage(r, f, knn_radii(f, k, budget), budget),
        "k": k,
    }


# -- feature networks ----------------------------------------------------------------------------


def inception_model(weights: str | None):
    """pytorch-fid's InceptionV3 (pool3, 2048-d) from a local weights file; never downloads.

    pytorch-fid fetches its weights through `torch.hub.load_state_dict_from_url`; that one call is
    answered from the file (or the hub cache's copy), read with weights_only=True, so neither the
    hub directory nor anything else of the process is changed."""
    from unittest import mock

    import pytorch_fid.inception as fid_inception

    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if weights and not Path(weights).is_file():
        raise WeightsError(f"--inception-weights {weights!r} does not exist")
    if not weights and not cached.is_file():
        raise WeightsError(
            f"the FID Inception weights ({INCEPTION_FILE}) are not in the torch hub cache {str(cached.parent)!r}; "
            "download them where a network is available and pass --inception-weights PATH "
            "(or use --space dinov2)"
        )
    file = Path(weights) if weights else cached

    def from_file(*args, **kwargs) -> dict:
        return torch.load(file, map_location="cpu", weights_only=True)

    with mock.patch.object(fid_inception, "load_state_dict_from_url", from_file):
        return fid_inception.InceptionV3([3]).eval()


class FeatureNet:
    """The feature network of one space: uint8 ADM crops (B, 256, 256, 3) -> (B, D) float64, and
    the identity of what computed them (compared between the two sides of a distance)."""

    def __init__(self, cfg: FidConfig):
        self.space, self.device = cfg.space, resolve_device(cfg.device)
        if cfg.space == "inception":
            self.model = inception_model(cfg.inception_weights)
            sha = state_sha256(self.model)
            network, input_size = "pytorch-fid InceptionV3 pool3", 299  # it resizes itself
        elif cfg.space == "dinov2":
            self.model, sha = load_backbone(cfg.backbone, cfg.weights)  # sha as stores record it
            self.model.eval()
            self.recipe = ViewRecipe(views=1, crop_size=CROP)
            network, input_size = cfg.backbone, self.recipe.input_size
        else:
            raise FlatDinoError(f"--space must be inception or dinov2; got {cfg.space!r}")
        self.model.to(self.device)
        self.identity = {
            "space": cfg.space,
            "network": network,
            "weights_sha256": sha,
            "crop": CROP,
            "input_size": input_size,
        }
        if cfg.space == "dinov2":  # the resize to 224 is part of the feature space
            self.identity["antialias"] = self.recipe.antialias

    def prepare(self, crop: np.ndarray) -> torch.Tensor:
        """One crop's network input, made on a loader thread: uint8 (3, 256, 256) for Inception
        (pytorch-fid resizes to 299 and normalises itself), view 0 of extract-features for DINOv2."""
        if self.space == "inception":
            return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)
        return make_views(crop, 0, self.recipe)[0]

    @torch.no_grad()
    def __call__(self, inputs: list[torch.Tensor]) -> np.ndarray:
        """Features (B, D) float64 of a batch of `prepare`d inputs."""
        x = torch.stack(inputs).to(self.device)
        if self.space == "inception":  # [0, 1]
            y = self.model(x.float().div_(255.0))[0]  # (B, 2048, 1, 1)
            return y.reshape(len(inputs), -1).double().cpu().numpy()
        return self.model(x).mean(1).double().cpu().numpy()  # (B, C): patches mean-pooled


# -- sets ----------------------------------------------------------------------------------------


@dataclass
class SetStats:
    """One side of a comparison: its statistics, how they were computed, and what was read."""

    path: str
    mu: np.ndarray
    sigma: np.ndarray
    identity: dict  # IDENTITY_FIELDS; a field of None is unknown (not compared)
    count: int | None = None  # vectors in the statistics (None: saved statistics)
    failed: int = 0  # unreadable images skipped
    vectors: np.ndarray | None = None  # the precision/recall subset (float32), when asked

    @property
    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mu, self.sigma


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


def _read_npz(path: Path, cfg: FidConfig, model: FeatureNet, keep: int | None) -> SetStats:
    """A samples.npz's arr_0 (uint8 N, H, W, 3), read `cfg.batch_size` rows at a time (never all)."""
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
        return _array_blocks(blocks, shape[0], model, keep, str(path), cfg.progress, cfg.workers)


def _array_blocks(
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
    acc = _Accumulator(n, keep)

    def prepare(block: np.ndarray) -> list[torch.Tensor]:
        return [model.prepare(_npz_crop(im)) for im in block]

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


def _npz_crop(image: np.ndarray) -> np.ndarray:
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


def _pr_subset(n: int, cap: int) -> np.ndarray:
    """The seeded subset of positions 0..n-1 whose vectors precision/recall keeps."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, cap, replace=False))


class _Accumulator:
    """Running statistics plus the precision/recall subset of a stream of vector batches."""

    def __init__(self, total: int, keep: int | None):
        self.stats: RunningStats | None = None
        self.position, self.kept = 0, []
        self.keep = None if keep is None else _pr_subset(total, keep)

    def add(self, x: np.ndarray) -> None:
        if self.stats is None:
            self.stats = RunningStats(x.shape[1])
        self.stats.add(x)
        if self.keep is not None:
            lo, hi = np.searchsorted(self.keep, [self.position, self.position + len(x)])
            self.kept.append(x[self.keep[lo:hi] - self.position].astype(np.float32))
        self.position += len(x)

    def result(self, path: str, identity: dict, failed: int = 0) -> SetStats:
        if self.stats is None or self.stats.n < 2:
            n = 0 if self.stats is None else self.stats.n
            raise FlatDinoError(
                f"{path!r} holds {n} readable sample(s); a Fréchet distance needs at least 2"
            )
        mu, sigma = self.stats.result()
        vectors = np.concatenate(self.kept) if self.keep is not None else None
        return SetStats(path, mu, sigma, identity, self.stats.n, failed, vectors)


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


def _npz_members(p: Path) -> set[str]:
    try:
        with zipfile.ZipFile(p) as z:
            return set(z.namelist())
    except (OSError, zipfile.BadZipFile) as e:
        raise FlatDinoError(f"{str(p)!r} is not a readable .npz ({e})") from e


def _is_saved_stats(path: str) -> bool:
    p = Path(path)
    return p.suffix == ".npz" and p.is_file() and "mu.npy" in _npz_members(p)


def load_set(path: str, cfg: FidConfig, net: Callable[[], FeatureNet] | None = None) -> SetStats:
    """The statistics of one set; `net()` gives the (shared, lazily built) feature network,
    by default one of `cfg`'s space."""
    net = net or (lambda: FeatureNet(cfg))
    p = Path(path)
    if not p.exists():
        raise FlatDinoError(f"{path!r} does not exist")
    keep = cfg.pr_samples if cfg.precision_recall else None
    if p.suffix == ".npz" and p.is_file():
        names = _npz_members(p)
        if "mu.npy" in names:
            return _saved_stats(p)
        if "arr_0.npy" not in names:
            raise FlatDinoError(
                f"{path!r} is neither a samples.npz (arr_0) nor saved statistics (mu, sigma)"
            )
        return _read_npz(p, cfg, net(), keep)
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

    acc, batch = _Accumulator(len(reader.items), keep), []
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
    if kind is not None:
        if kind != "flatdino.features":
            raise FlatDinoError(f"{str(p)!r} is a {kind} store; FD needs a feature store")
        store = FeatureStore.open_complete(str(p), "the set")
        fp = store.attrs.get("fingerprint", {})
        recipe = fp.get("preprocessing", {})
        identity = {
            "space": "dinov2",
            "network": fp.get("backbone"),
            "weights_sha256": fp.get("weights_sha256"),
            "crop": recipe.get("crop_size"),
            "input_size": recipe.get("input_size"),
            "antialias": ViewRecipe.from_attrs(recipe).antialias,
        }
        data, valid = store.features, np.asarray(store.group["valid"][:], bool)
        step = row_block(data)
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
        valid, step = np.ones(len(data), bool), 1024
    acc = _Accumulator(int(valid.sum()), keep)
    for lo in tqdm(range(0, data.shape[0], step), desc=f"fid {p.name}", disable=not cfg.progress):
        block = data[lo : lo + step, 0] if kind is not None else data[lo : lo + step]
        x = np.asarray(block, np.float32).mean(1)[valid[lo : lo + step]]
        if len(x):
            acc.add(x)
    return acc.result(str(p), identity)


def _saved_stats(p: Path) -> SetStats:
    with np.load(p, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        mu, sigma = z["mu"], z["sigma"]
    if not meta:
        log.warning(
            "%s: saved statistics without a record of how they were computed; "
            "comparing them unchecked",
            p,
        )
    identity = {k: meta.get("identity", {}).get(k) for k in IDENTITY_FIELDS}
    return SetStats(str(p), mu, sigma, identity, meta.get("count"))


def save_stats(s: SetStats, path: str) -> None:
    """mu, sigma and a JSON record of how they were computed (read back by `load_set`)."""
    meta = {"identity": s.identity, "count": s.count, "source": s.path}
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:  # a file handle: np.savez would add .npz to a name
        np.savez(f, mu=s.mu, sigma=s.sigma, meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)


def check_comparable(a: SetStats, b: SetStats) -> None:
    """Refuse two sides whose known identities differ, naming the first field that does."""
    for name in IDENTITY_FIELDS:
        x, y = a.identity.get(name), b.identity.get(name)
        if x is not None and y is not None and x != y:
            show = (lambda v: str(v)[:12]) if name == "weights_sha256" else str
            raise FlatDinoError(
                f"the two sets were computed differently: {name} {show(x)} for {a.path!r} but "
                f"{show(y)} for {b.path!r}; compute both with the same --space, --backbone, "
                "--weights and --inception-weights (or recompute the saved statistics)"
            )


def fid(cfg: FidConfig) -> dict:
    """FD (and precision/recall) between cfg.real and cfg.fake; returns the result record."""
    if cfg.batch_size < 1 or cfg.workers < 1 or cfg.pr_samples < cfg.k + 1:
        raise FlatDinoError("--batch-size and --workers must be at least 1, --pr-samples above k")
    if not 0.0 <= cfg.max_failed_fraction <= 1.0:
        raise FlatDinoError("--max-failed-fraction must be in [0, 1]")
    _check_request(cfg)  # before the --real pass, which can take an hour
    built: list[FeatureNet] = []

    def net() -> FeatureNet:  # built once, only when a side needs it
        if not built:
            built.append(FeatureNet(cfg))
        return built[0]

    real = load_set(cfg.real, cfg, net)
    if cfg.save_stats:  # kept at once: a failure on --fake does not lose the --real pass
        save_stats(real, cfg.save_stats)
    if not cfg.fake:  # the reference's statistics only, to save and reuse
        return {
            "real": cfg.real,
            "space": cfg.space,
            "real_count": real.count,
            "real_failed": real.failed,
            "saved": cfg.save_stats,
            "identity": real.identity,
        }
    fake = load_set(cfg.fake, cfg, net)
    check_comparable(real, fake)
    result = {
        "real": cfg.real,
        "fake": cfg.fake,
        "space": cfg.space,
        "fd": frechet_distance(real.stats, fake.stats),
        "real_count": real.count,
        "fake_count": fake.count,
        "real_failed": real.failed,
        "fake_failed": fake.failed,
        "identity": {k: real.identity.get(k) or fake.identity.get(k) for k in IDENTITY_FIELDS},
    }
    if cfg.precision_recall:
        for side in (real, fake):
            if side.vectors is None or len(side.vectors) <= cfg.k:
                raise FlatDinoError(
                    f"--precision-recall needs more than k={cfg.k} samples per set; {side.path!r} "
                    f"has {side.count}"
                )
        device = str(resolve_device(cfg.device))
        result.update(precision_recall(real.vectors, fake.vectors, cfg.k, device))
        result["pr_samples"] = [len(real.vectors), len(fake.vectors)]
    return result


def _check_request(cfg: FidConfig) -> None:
    """The refusals that need no feature network, made before any set is read."""
    if not cfg.fake and not cfg.save_stats:
        raise FlatDinoError(
            "give --fake to compare with, or --save-stats to keep --real's statistics"
        )
    if cfg.save_stats and not cfg.save_stats.endswith(".npz"):
        raise FlatDinoError(f"--save-stats {cfg.save_stats!r} must name a .npz file")
    for option, path in (("--real", cfg.real), ("--fake", cfg.fake)):
        if path and not Path(path).exists():
            raise FlatDinoError(f"{option} {path!r} does not exist")
        if cfg.precision_recall and path and _is_saved_stats(path):
            raise FlatDinoError(
                f"--precision-recall needs both sets as samples; {option} {path!r} is saved "
                "statistics (drop --precision-recall, or pass the images)"
            )


# -- rFID ----------------------------------------------------------------------------------------


@torch.no_grad()
def reconstructions(
    features: str,
    vae_path: str,
    decoder_path: str,
    images: int = 1000,
    batch: int = 32,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """uint8 (N, H, W, 3) sets for rFID on view 0 of a store's first `images` valid images: the
    true crops, the pixel decoder on the features, and the decoder on the VAE's reconstruction."""
    store = FeatureStore(features)
    vae = load_vae(resolve_vae(vae_path))[0].to(device)
    decoder = load_pixel_decoder(decoder_path)[0].to(device)
    rows = store.valid_rows(images)
    targets = TargetImages(store, 4)
    to_uint8 = lambda x: (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # noqa: E731
    sets: dict[str, list] = {"images": [], "decoder": [], "vae_decoder": []}
    for i in range(0, len(rows), batch):
        r = rows[i : i + batch]
        x = torch.from_numpy(store.features.get_orthogonal_selection((r, 0))).float().to(device)
        sets["images"].append(to_uint8(targets.batch(r, np.zeros(len(r), int))))
        sets["decoder"].append(to_uint8(decoder(x)))
        sets["vae_decoder"].append(to_uint8(decoder(vae.decode(vae.encode(x)[0]))))
    return {k: np.concatenate(v) for k, v in sets.items()}


def array_stats(
    images: np.ndarray, net: FeatureNet, batch: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of in-memory uint8 images (N, H, W, 3), ADM-cropped to 256 where needed."""
    blocks = (images[i : i + batch] for i in range(0, len(images), batch))
    return _array_blocks(blocks, len(images), net, None, "images", progress=False).stats
