"""`flatdino extract-features`: images -> DINOv2 patch features in a resumable Zarr store.

The job is a chain over shards (consecutive, chunk-aligned image ranges):

    decode_shard (CPU, plain function)  ->  ShardEmbedder (backbone, loaded once)  ->  store

`pipeline.engine.run_shards` calls these in-process (backend "local") or on Ray (`decode_shard` as
CPU tasks, `ShardEmbedder` as a pool of actors, GPUs when asked). Both call the same functions on the
same shards and batches, so they write identical bytes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from ..models.dinov2 import BACKBONES, DinoPatchFeatures
from .backbone import load_backbone
from .configs import FEATURE_DTYPES, ExtractConfig
from .engine import Placement, ShardJob, run_shards
from .env import package_version, resolve_device
from .errors import FlatDinoError, TooManyFailuresError, WeightsError
from .feature_store import FeatureStore
from .lock import writer_lock
from .preprocess import ViewRecipe, adm_center_crop, to_rgb, views_from_crops
from .sources import ImageSource, load_image, open_source
from .store import Shard, check_finite, open_or_create

log = logging.getLogger("flatdino.extract")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ExtractSummary:
    """What one run did (also printed by the CLI)."""

    store: str
    images: int
    shards_total: int
    shards_run: int
    images_run: int = 0
    failed: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0  # over the whole run, start-up included
    steady_images_per_s: float = 0.0  # after the first shard finished (start-up excluded)
    failures: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- the shard functions


@dataclass
class DecodedShard:
    """The CPU half of a shard: the uint8 crops of every decodable image, and the errors.

    Crops, not views, travel to the worker: 196,608 bytes an image instead of V x 602,112 float32
    bytes, and the resizes run on the worker's device (`preprocess.views_from_crops`)."""

    shard: Shard
    crops: np.ndarray  # (n_ok, 256, 256, 3) uint8 ADM centre crops
    valid: np.ndarray  # (n,) bool
    errors: dict[int, str]  # image index -> "ExceptionType: message"
    recipe: ViewRecipe  # how the worker turns the crops into views

    @property
    def indices(self) -> np.ndarray:
        """(n_ok,) image indices of the crops (they seed the random crops of views >= 2)."""
        return self.shard.start + np.flatnonzero(self.valid)


def decode_shard(
    kind: str, root: str, paths: list[str], shard: Shard, recipe: ViewRecipe
) -> DecodedShard:
    """Decode and ADM-crop images [shard.start, shard.stop); bad images become errors."""
    crops, valid, errors = [], np.zeros(shard.stop - shard.start, dtype=bool), {}
    for offset, path in enumerate(paths):
        index = shard.start + offset
        try:
            with load_image(kind, root, path) as img:
                crops.append(adm_center_crop(to_rgb(img), recipe.crop_size))
            valid[offset] = True
        except Exception as e:  # any decode failure marks only this image invalid
            errors[index] = f"{type(e).__name__}: {e}"[:500]
    shape = (0, recipe.crop_size, recipe.crop_size, 3)
    stacked = np.stack(crops) if crops else np.zeros(shape, np.uint8)
    return DecodedShard(shard, stacked, valid, errors, recipe)


@torch.inference_mode()
def embed_views(
    model: DinoPatchFeatures,
    crops: np.ndarray,
    indices: np.ndarray,
    recipe: ViewRecipe,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """(n, S, S, 3) uint8 crops -> float16 (features (n, V, P, C), CLS tokens (n, V, C)) of their
    views.

    Views are made on `device` one backbone batch at a time, so memory holds one batch of float32
    views whatever the shard size. Batches are the same `batch_size` slices of the flattened
    (n*V) views as when whole views were shipped (CPU matmuls round differently for other batch
    shapes); an image whose views straddle two batches has its views made twice.
    """
    n, v = len(crops), recipe.views
    if not crops.flags.writeable:  # Ray hands over read-only, zero-copy arrays
        crops = crops.copy()
    pixels = torch.from_numpy(crops)  # (n, S, S, 3) uint8
    out = np.empty((n * v, model.num_patches, model.dim), np.float16)
    cls = np.empty((n * v, model.dim), np.float16)
    for i in range(0, n * v, batch_size):
        j = min(i + batch_size, n * v)
        lo, hi = i // v, -(-j // v)  # the images whose views fall in [i, j)
        crop = pixels[lo:hi].to(device, non_blocking=True)
        views = views_from_crops(crop, indices[lo:hi], recipe, device).flatten(0, 1)
        x = views[i - lo * v : j - lo * v]  # (b, 3, H, W) of the ((hi-lo)*V) views
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            y, c = model.tokens(x)  # (b, P, C), (b, C)
        out[i:j] = y.float().cpu().numpy().astype(np.float16)
        cls[i:j] = c.float().cpu().numpy().astype(np.float16)
    return out.reshape(n, v, *out.shape[1:]), cls.reshape(n, v, -1)  # (n, V, P, C), (n, V, C)


class ShardEmbedder:
    """Runs the backbone over decoded shards and writes them; loads the model once (a Ray actor)."""

    def __init__(self, cfg: ExtractConfig, expected_sha: str):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        model, sha = load_backbone(cfg.backbone, cfg.weights)
        if sha != expected_sha:  # e.g. another file at the same path on another node
            raise WeightsError(
                f"worker loaded weights with sha256 {sha[:12]}, driver {expected_sha[:12]}; "
                "--weights must be the same file on every node (a shared file system, or copy it)"
            )
        self.model = model.to(self.device)
        self.store = FeatureStore(cfg.out, mode="r+")

    def __call__(self, decoded: DecodedShard) -> tuple[int, int, dict[int, str]]:
        """Embed and write one shard; returns (shard index, images, errors)."""
        shard = decoded.shard
        n = shard.stop - shard.start
        feats = np.zeros((n, *self.store.features.shape[1:]), np.float16)
        _, v, _, c = feats.shape
        cls = np.zeros((n, v, c), np.float16)  # (n, V, C)
        if len(decoded.crops):
            feats[decoded.valid], cls[decoded.valid] = embed_views(
                self.model,
                decoded.crops,
                decoded.indices,
                decoded.recipe,
                self.cfg.batch_size,
                DTYPES[self.cfg.dtype],
                self.device,
            )
        fix = "check --weights, or use --dtype fp32"
        check_finite(feats, shard, "the backbone's float16 features", fix)
        kept = cls if self.store.has_cls else None  # None: a store made with --no-cls
        if kept is not None:
            check_finite(kept, shard, "the backbone's float16 CLS tokens", fix)
        self.store.write_shard(shard, feats, decoded.valid, decoded.errors, cls=kept)
        return shard.index, n, decoded.errors


# --------------------------------------------------------------------------- the job


def fingerprint(cfg: ExtractConfig, source: ImageSource, recipe: ViewRecipe, sha: str) -> dict:
    """What must match for a store to be resumed: backbone, weights, preprocessing, input."""
    fp = {
        "backbone": cfg.backbone,
        "weights_sha256": sha,
        "dtype": cfg.dtype,
        "preprocessing": recipe.to_dict(),
        "input": {
            "kind": source.kind,
            "split": source.split,
            "images": len(source),
            "sha256": source.fingerprint(),
        },
        "batch_size": cfg.batch_size,  # CPU matmuls round differently for other batch shapes
        "shard_size": cfg.shard_size,
        "chunk_rows": cfg.chunk_rows,
    }
    if cfg.feature_dtype != "float16":  # float16 stores keep the fingerprint they always had
        fp["feature_dtype"] = cfg.feature_dtype
    if cfg.cls_token:  # --no-cls stores keep it too, so a store from before --cls resumes
        fp["cls_token"] = True
    return json.loads(json.dumps(fp))  # the form it takes after a round trip through zarr.json


OPTIONS = {"cls_token": "--cls/--no-cls", "feature_dtype": "--feature-dtype"}  # fingerprint keys


def open_or_create_store(
    cfg: ExtractConfig, source: ImageSource, fp: dict, dim: int, patches: int
) -> FeatureStore:
    """Resume a matching store, replace it with --overwrite, or create a fresh one."""
    layout = FeatureStore.layout(
        shape=(len(source), cfg.views, patches, dim),
        labels=np.asarray(source.labels, dtype=np.int32),
        paths=list(source.paths),
        class_names=list(source.class_names),
        shard_size=cfg.shard_size,
        chunk_rows=cfg.chunk_rows,
        feature_dtype=cfg.feature_dtype,
        cls_token=cfg.cls_token,
        attrs={
            "fingerprint": fp,
            "config": asdict(cfg),
            "input_root": source.root,
            "num_patches": patches,
            "feature_dim": dim,
            "feature_space": "DINOv2 patch tokens, final LayerNorm without affine (RAE)",
            "package_version": package_version(),
        },
    )
    return open_or_create(FeatureStore, cfg.out, fp, cfg.overwrite, layout, OPTIONS)


def validate(cfg: ExtractConfig) -> None:
    checks = [
        (cfg.backbone in BACKBONES, f"--backbone must be one of {sorted(BACKBONES)}"),
        (cfg.views >= 1, "--views must be >= 1"),
        (cfg.batch_size >= 1, "--batch-size must be >= 1"),
        (cfg.workers >= 1, "--workers must be >= 1"),
        (cfg.decode_per_cpu >= 1, "--decode-tasks-per-cpu must be >= 1"),
        (
            cfg.chunk_rows >= 1 and cfg.shard_size % cfg.chunk_rows == 0,
            f"--shard-size must be a positive multiple of {cfg.chunk_rows} (chunk rows)",
        ),
        (cfg.dtype in DTYPES, f"--dtype must be one of {sorted(DTYPES)}"),
        (
            cfg.feature_dtype in FEATURE_DTYPES,
            f"--feature-dtype must be one of {FEATURE_DTYPES}; got {cfg.feature_dtype!r}",
        ),
        (cfg.backend in ("ray", "local"), "--backend must be ray or local"),
        (0.0 <= cfg.max_failed_fraction <= 1.0, "--max-failed-fraction must be in [0, 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise FlatDinoError(message)


def decode_job(
    source: ImageSource, recipe: ViewRecipe, worker_cls: type, worker_args: tuple
) -> ShardJob:
    """`decode_shard` of each shard of `source`, handed to `worker_cls(*worker_args)`."""

    def args(s: Shard) -> tuple:
        return source.kind, source.root, list(source.paths[s.start : s.stop]), s, recipe

    return ShardJob(decode_shard, args, worker_cls, worker_args)


def _run_with_progress(
    cfg: ExtractConfig,
    source: ImageSource,
    todo: list[Shard],
    recipe: ViewRecipe,
    sha: str,
    summary: ExtractSummary,
) -> None:
    """Run the backend over `todo` with a progress bar, filling in the summary's counters."""
    job = decode_job(source, recipe, ShardEmbedder, (cfg, sha))
    placement = Placement(
        cfg.backend,
        cfg.workers,
        cfg.num_gpus_per_worker,
        cfg.ray_address,
        cfg.torch_threads,
        cfg.decode_per_cpu,
    )
    remaining = sum(s.stop - s.start for s in todo)
    total = summary.images
    start = time.perf_counter()
    first_done, steady_images = None, 0
    with tqdm(
        total=total,
        initial=total - remaining,
        unit="img",
        desc="extract-features",
        disable=not cfg.progress,
    ) as bar:
        for _, n, errors in run_shards(job, todo, placement):
            summary.images_run += n
            summary.failed += len(errors)
            bar.update(n)
            if errors:
                bar.set_postfix(failed=summary.failed)
            if first_done is None:
                first_done = time.perf_counter()  # start-up (Ray, model load) ends here
            else:
                steady_images += n
    end = time.perf_counter()
    summary.seconds = end - start
    summary.images_per_s = summary.images_run / max(summary.seconds, 1e-9)
    if steady_images:
        summary.steady_images_per_s = steady_images / max(end - first_done, 1e-9)


def extract_features(cfg: ExtractConfig) -> ExtractSummary:
    """Run (or resume) the extraction job of `cfg`; raises TooManyFailuresError after finishing."""
    validate(cfg)
    source = open_source(cfg.data, cfg.split)
    if source.skipped_files:
        log.warning("skipped %d files without an image extension", source.skipped_files)
    empty = sorted(set(source.class_names) - {source.class_names[i] for i in set(source.labels)})
    if empty:
        log.warning("%d classes have no images (labels kept): %s", len(empty), ", ".join(empty[:5]))
    recipe = ViewRecipe(views=cfg.views, seed=cfg.view_seed)
    probe, sha = load_backbone(cfg.backbone, cfg.weights)  # identity and shape before any work
    with writer_lock(cfg.out, f"--out {cfg.out!r}"):  # the driver's; Ray workers only write shards
        fp = fingerprint(cfg, source, recipe, sha)
        store = open_or_create_store(cfg, source, fp, probe.dim, probe.num_patches)
        del probe
        return _finish(cfg, source, recipe, sha, store)


def _finish(
    cfg: ExtractConfig, source: ImageSource, recipe: ViewRecipe, sha: str, store: FeatureStore
) -> ExtractSummary:
    """Write the shards still to do, finalize, and check the failed fraction."""
    todo = store.todo()
    summary = ExtractSummary(store.path, store.num_images, len(store.shards()), len(todo))
    if todo:
        _run_with_progress(cfg, source, todo, recipe, sha, summary)
    if not store.attrs.get("complete"):
        store.finalize()
    errors = store.shard_errors()
    summary.failed = len(errors)
    summary.failures = [f"{source.paths[i]}: {e}" for i, e in sorted(errors.items())[:5]]
    if summary.failed > cfg.max_failed_fraction * store.num_images:
        raise TooManyFailuresError(
            f"{summary.failed} of {store.num_images} images failed to decode (more than "
            f"--max-failed-fraction {cfg.max_failed_fraction}); the store is complete and their "
            f"rows are marked invalid, see {store.path}/manifest.parquet (first: {summary.failures[0]})"
        )
    return summary
