"""`flatdino encode-latents`: a feature store -> FlatDINO latents (mu, optional logvar) in Zarr.

Runs on the shard engine of extract-features (`pipeline.engine`): `read_shard` reads a shard's
features on a CPU task, `ShardEncoder` (the VAE encoder, loaded once) encodes every stored view of
every valid image and writes the shard, then marks it done. Resume, idempotence and refusal work as
for feature stores.

Layout (FORMAT_VERSION 1), N images, V views, T tokens, d dims:
    STORE/zarr.json   attrs: kind, fingerprint (VAE sha256 + config, features store identity, dtype),
                      shard_size, class_names, complete, created, package_version
    STORE/mu          float32 | float16 (N, V, T, d), one chunk per shard
    STORE/logvar      same shape (with --save-logvar)
    STORE/labels      int32 (N,);  STORE/valid  bool (N,) (copied from the feature store)
    STORE/done        bool (shards,)
    STORE/mu_mean, STORE/mu_std   float32 (T, d): statistics of mu over valid rows and all views
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import zarr
from safetensors.torch import load_file
from tqdm import tqdm

from .checkpoints import resolve_checkpoint
from .engine import Placement, ShardJob, run_shards
from .errors import FlatDinoError, StoreMismatchError
from .extract import package_version, resolve_device
from .store import FeatureStore, Shard, check_fingerprint, shard_bounds

KIND = "flatdino.latents"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class EncodeConfig:
    """Everything `encode_latents` needs; the CLI only fills it in."""

    features: str  # feature store to encode
    vae: str  # train-vae run folder (uses best/, else checkpoints/) or a checkpoint folder
    out: str  # latents store (created or resumed)
    batch_size: int = 256  # encoder batch (images x views)
    dtype: str = "float32"  # stored dtype of mu (and logvar): float32 | float16
    save_logvar: bool = False  # also store logvar
    device: str = "auto"
    backend: str = "ray"  # ray | local
    workers: int = 1
    num_gpus_per_worker: float | None = None
    ray_address: str | None = None
    overwrite: bool = False
    progress: bool = True


def resolve_vae(path: str) -> Path:
    """The VAE checkpoint folder of --vae: given, or RUN/best, or RUN/checkpoints."""
    return resolve_checkpoint(path, "--vae", "train-vae")


def load_vae(ckpt: Path):
    """Rebuild the VAE from its config.json and load its weights; returns (model, file sha256)."""
    from flatdino.trainers.vae import FlatDinoVAE, VAEConfig

    model = FlatDinoVAE(VAEConfig(**json.loads((ckpt / "config.json").read_text())))
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
    return model.eval().requires_grad_(False), vae_sha256(ckpt)


def vae_sha256(ckpt: Path) -> str:
    """sha256 of a checkpoint's model.safetensors: the VAE's identity in latents stores."""
    return hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()


def read_shard(features: str, shard: Shard) -> tuple[Shard, np.ndarray, np.ndarray]:
    """The CPU half: one contiguous read of a shard's features (n, V, P, C) and valid flags."""
    group = zarr.open_group(features, mode="r")
    feats = group["features"][shard.start : shard.stop]
    valid = np.asarray(group["valid"][shard.start : shard.stop], dtype=bool)
    return shard, feats, valid


class ShardEncoder:
    """Encodes shards with the VAE encoder and writes them (a Ray actor, or in-process)."""

    def __init__(self, cfg: EncodeConfig, ckpt: str, expected_sha: str):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        model, sha = load_vae(Path(ckpt))
        if sha != expected_sha:
            raise FlatDinoError(f"worker loaded VAE {sha[:12]}, driver {expected_sha[:12]}")
        self.model = model.to(self.device)
        self.group = zarr.open_group(cfg.out, mode="r+")

    @torch.inference_mode()
    def __call__(self, payload: tuple[Shard, np.ndarray, np.ndarray]) -> tuple[int, int, dict]:
        shard, feats, valid = payload
        n, v = feats.shape[:2]
        t, d = self.model.cfg.tokens, self.model.cfg.latent_dim
        mu = np.zeros((n, v, t, d), np.float32)
        logvar = np.zeros_like(mu)
        flat = torch.from_numpy(np.ascontiguousarray(feats[valid])).reshape(-1, *feats.shape[2:])
        out_mu, out_lv = [], []
        for i in range(0, len(flat), self.cfg.batch_size):
            m, lv = self.model.encode(flat[i : i + self.cfg.batch_size].to(self.device).float())
            out_mu.append(m.float().cpu().numpy())
            out_lv.append(lv.float().cpu().numpy())
        if out_mu:
            mu[valid] = np.concatenate(out_mu).reshape(-1, v, t, d)
            logvar[valid] = np.concatenate(out_lv).reshape(-1, v, t, d)
        self.group["mu"][shard.start : shard.stop] = mu.astype(self.cfg.dtype)
        if self.cfg.save_logvar:
            self.group["logvar"][shard.start : shard.stop] = logvar.astype(self.cfg.dtype)
        self.group["done"][shard.index] = True  # last: the shard is complete
        return shard.index, n, {}


def _fingerprint(cfg: EncodeConfig, features: FeatureStore, vae_cfg: dict, sha: str) -> dict:
    fp = {
        "vae_sha256": sha,
        "vae_config": vae_cfg,
        "features_fingerprint": features.attrs.get("fingerprint"),
        "features_images": features.num_images,
        "dtype": cfg.dtype,
        "save_logvar": cfg.save_logvar,
        "batch_size": cfg.batch_size,
    }
    return json.loads(json.dumps(fp))


def _create(
    cfg: EncodeConfig, features: FeatureStore, t: int, d: int, fp: dict, ckpt: Path
) -> None:
    """An empty latents store, built beside --out and renamed into place."""
    n, v = features.features.shape[:2]
    out = Path(cfg.out)
    for stale in out.parent.glob(f".{out.name}.creating-*"):  # left by a killed creation
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.with_name(f".{out.name}.creating-{os.getpid()}")
    group = zarr.create_group(str(tmp), zarr_format=3)
    size = features.shard_size
    for name in ("mu", "logvar") if cfg.save_logvar else ("mu",):
        group.create_array(
            name, shape=(n, v, t, d), chunks=(size, v, t, d), dtype=cfg.dtype, fill_value=0
        )
    group.create_array("labels", shape=(n,), chunks=(max(1, n),), dtype="int32")
    group.create_array("valid", shape=(n,), chunks=(max(1, n),), dtype="bool")
    group.create_array(
        "done", shape=(len(features.shards()),), chunks=(1,), dtype="bool", fill_value=False
    )
    group["labels"][:] = features.group["labels"][:]
    group["valid"][:] = features.group["valid"][:]
    group.attrs.update({
        "kind": KIND, "format_version": FORMAT_VERSION, "shard_size": size, "fingerprint": fp,
        "vae_checkpoint": str(ckpt.resolve()), "features_store": str(features.path.resolve()),
        "class_names": features.attrs.get("class_names"), "config": asdict(cfg), "complete": False,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "package_version": package_version(),
    })  # fmt: skip
    os.replace(tmp, out)


def _finalize(out: str) -> None:
    """Per-(token, dim) mean and std of mu over valid rows and all views (float64 sums)."""
    group = zarr.open_group(out, mode="r+")
    valid = np.asarray(group["valid"][:], dtype=bool)
    mu = group["mu"]
    total, total_sq, count = 0.0, 0.0, 0
    for s in shard_bounds(mu.shape[0], int(group.attrs["shard_size"])):
        block = mu[s.start : s.stop][valid[s.start : s.stop]].astype(np.float64)  # (k, V, T, d)
        total = total + block.sum((0, 1))
        total_sq = total_sq + (block**2).sum((0, 1))
        count += block.shape[0] * block.shape[1]
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean**2, 0.0))
    t, d = mu.shape[2:]
    for name, value in (("mu_mean", mean), ("mu_std", std)):
        group.create_array(name, shape=(t, d), dtype="float32", overwrite=True)
        group[name][:] = np.broadcast_to(value, (t, d)).astype(np.float32)
    group.attrs.update({"complete": True, "num_valid": int(valid.sum())})


def _open_or_create(
    cfg: EncodeConfig, features: FeatureStore, t: int, d: int, fp: dict, ckpt: Path
) -> zarr.Group:
    out = Path(cfg.out)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty directory made by the user: create the store in its place
    if out.exists():
        group = zarr.open_group(str(out), mode="r+") if (out / "zarr.json").exists() else None
        if group is None or group.attrs.get("kind") != KIND:  # never deleted, even with --overwrite
            raise StoreMismatchError(
                f"--out {cfg.out!r} exists and is not a latents store; choose another --out"
            )
        if not cfg.overwrite:
            check_fingerprint(out, dict(group.attrs).get("fingerprint", {}), fp)
            return group
        shutil.rmtree(out)
    _create(cfg, features, t, d, fp, ckpt)
    return zarr.open_group(str(out), mode="r+")


def latents_summary(path: str | Path) -> dict:
    """What `flatdino info` prints for a latents store (the layout of FeatureStore.summary)."""
    group = zarr.open_group(str(path), mode="r")
    names = [
        n for n in ("mu", "logvar", "labels", "valid", "done", "mu_mean", "mu_std") if n in group
    ]
    arrays = {n: {"shape": list(group[n].shape), "dtype": str(group[n].dtype),
                  "chunks": list(group[n].chunks)} for n in names}  # fmt: skip
    done = np.asarray(group["done"][:], dtype=bool)
    return {
        "path": str(path), "arrays": arrays, "images": int(group["mu"].shape[0]),
        "valid": int(np.asarray(group["valid"][:], dtype=bool).sum()),
        "shards_done": f"{int(done.sum())}/{len(done)}", "complete": bool(group.attrs.get("complete")),
        "attrs": dict(group.attrs),
    }  # fmt: skip


def encode_latents(cfg: EncodeConfig) -> dict:
    """Encode (or finish encoding) `cfg.features` into `cfg.out`; returns a summary."""
    if cfg.dtype not in ("float32", "float16"):
        raise FlatDinoError(f"--dtype must be float32 or float16; got {cfg.dtype!r}")
    features = FeatureStore(cfg.features)
    if not features.attrs.get("complete"):
        raise FlatDinoError(
            f"--features {cfg.features!r} is incomplete; finish extract-features first"
        )
    ckpt = resolve_vae(cfg.vae)
    vae_cfg = json.loads((ckpt / "config.json").read_text())
    _, _, p, c = features.features.shape
    if (vae_cfg["num_patches"], vae_cfg["in_dim"]) != (p, c):
        raise FlatDinoError(
            f"VAE {str(ckpt)!r} expects (P, C) = ({vae_cfg['num_patches']}, {vae_cfg['in_dim']}) "
            f"but --features holds ({p}, {c}); use the VAE trained on this backbone's features"
        )
    sha = vae_sha256(ckpt)
    fp = _fingerprint(cfg, features, vae_cfg, sha)
    group = _open_or_create(cfg, features, vae_cfg["tokens"], vae_cfg["latent_dim"], fp, ckpt)
    shards = features.shards()
    done = np.asarray(group["done"][:], dtype=bool)
    todo = [s for s, ok in zip(shards, done, strict=True) if not ok]
    job = ShardJob(
        read_shard, lambda s: (str(features.path), s), ShardEncoder, (cfg, str(ckpt), sha)
    )
    placement = Placement(cfg.backend, cfg.workers, cfg.num_gpus_per_worker, cfg.ray_address)
    start, images = time.perf_counter(), 0
    with tqdm(total=features.num_images, initial=features.num_images - sum(s.stop - s.start for s in todo),
              unit="img", desc="encode-latents", disable=not cfg.progress) as bar:  # fmt: skip
        for _, n, _ in run_shards(job, todo, placement) if todo else ():
            images += n
            bar.update(n)
    if not group.attrs.get("complete"):
        _finalize(cfg.out)
    seconds = time.perf_counter() - start
    return {"store": cfg.out, "images": features.num_images, "shards_run": len(todo),
            "images_run": images, "seconds": seconds}  # fmt: skip
