"""`flatdino encode-latents`: a feature store -> FlatDINO latents (mu, optional logvar) in Zarr.

Runs on the shard engine of extract-features (`pipeline.engine`): `read_shard` reads a shard's
features (and CLS tokens, format 4) on a CPU task, `ShardEncoder` (the VAE encoder, loaded once)
encodes every stored view of every valid image and writes the shard with the CLS tokens as they
are (not encoded, not normalised), then marks it done. Resume, idempotence and refusal are
`pipeline.store.open_or_create`'s, as for feature stores; the layout is `LatentStore`'s.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from operator import itemgetter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .checkpoints import load_vae, read_json, resolve_vae, rewrite, vae_sha256
from .configs import EncodeConfig
from .engine import Placement, ShardJob, run_shards
from .env import autocast, fast_matmul, inference_dtype, package_version, resolve_device
from .errors import FlatDinoError
from .feature_store import FeatureStore
from .latent_store import LatentStore
from .lock import writer_lock
from .quantise import Stored, each, to_device
from .store import Shard, check_finite, open_or_create

Payload = tuple[Shard, Stored, np.ndarray, np.ndarray | None]


def read_shard(features: str, shard: Shard) -> Payload:
    """The CPU half: one contiguous read of a shard's stored features (n, V, P, C) (int8: with
    their scales, dequantised on the encoder's device), valid flags, and float16 CLS tokens
    (n, V, C) when the store keeps them (else None)."""
    store = FeatureStore(features)
    cls = store.read_cls(shard.start, shard.stop) if store.has_cls else None
    return shard, *store.read_shard(shard), cls


class ShardEncoder:
    """Encodes shards with the VAE encoder and writes them (a Ray actor, or in-process)."""

    def __init__(self, cfg: EncodeConfig, ckpt: str, expected_sha: str):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = inference_dtype(cfg.precision, self.device)
        model, sha = load_vae(Path(ckpt))
        if sha != expected_sha:
            raise FlatDinoError(  # e.g. another file at the same path on another node
                f"worker loaded VAE {sha[:12]}, driver {expected_sha[:12]}; --vae must be the same "
                "files on every node (a shared file system, or copy them)"
            )
        self.model = model.to(self.device)
        self.store = LatentStore(cfg.out, mode="r+")

    @torch.inference_mode()
    def __call__(self, payload: Payload) -> tuple[int, int, dict]:
        shard, feats, valid, cls = payload
        n, v = (feats[0] if isinstance(feats, tuple) else feats).shape[:2]  # codes or features
        t, d = self.model.cfg.tokens, self.model.cfg.latent_dim
        mu = np.zeros((n, v, t, d), np.float32)
        logvar = np.zeros_like(mu)
        # (n_ok * V, P, C) (and (n_ok * V, P) scales): the valid rows' views, flattened
        flat = each(feats, lambda a: torch.from_numpy(np.ascontiguousarray(a[valid])).flatten(0, 1))
        out_mu, out_lv = [], []
        for i in range(0, int(valid.sum()) * v, self.cfg.batch_size):
            batch = each(flat, itemgetter(slice(i, i + self.cfg.batch_size)))
            x = to_device(batch, self.device)  # (b, P, C) float32
            with fast_matmul(self.device, self.cfg.precision), autocast(self.dtype, self.device):
                m, lv = self.model.encode(x)
            out_mu.append(m.float().cpu().numpy())
            out_lv.append(lv.float().cpu().numpy())
        if out_mu:
            mu[valid] = np.concatenate(out_mu).reshape(-1, v, t, d)
            logvar[valid] = np.concatenate(out_lv).reshape(-1, v, t, d)
        fix = "check the VAE with `flatdino info` and its features store for non-finite values"
        check_finite(mu.astype(self.cfg.dtype), shard, "the VAE's latents (mu)", fix)
        if self.cfg.save_logvar:
            check_finite(logvar.astype(self.cfg.dtype), shard, "the VAE's logvar", fix)
        self.store.write_shard(shard, mu, logvar if self.cfg.save_logvar else None, cls)
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
        "precision": cfg.precision,  # a store is never finished in another precision
    }
    return json.loads(json.dumps(fp))


def encode_latents(cfg: EncodeConfig) -> dict:
    """Encode (or finish encoding) `cfg.features` into `cfg.out`; returns a summary."""
    if cfg.dtype not in ("float32", "float16"):
        raise FlatDinoError(f"--dtype must be float32 or float16; got {cfg.dtype!r}")
    inference_dtype(
        cfg.precision, torch.device("cpu")
    )  # a bad --precision fails here, not in a worker
    features = FeatureStore.open_complete(cfg.features, "--features")
    ckpt = resolve_vae(cfg.vae)
    vae_cfg = read_json(ckpt / "config.json", rewrite("train-vae"))
    _, _, p, c = features.features.shape
    if (vae_cfg["num_patches"], vae_cfg["in_dim"]) != (p, c):
        raise FlatDinoError(
            f"VAE {str(ckpt)!r} expects (P, C) = ({vae_cfg['num_patches']}, {vae_cfg['in_dim']}) "
            f"but --features holds ({p}, {c}); use the VAE trained on this backbone's features"
        )
    sha = vae_sha256(ckpt)
    fp = _fingerprint(cfg, features, vae_cfg, sha)
    layout = LatentStore.layout(
        features,
        vae_cfg["tokens"],
        vae_cfg["latent_dim"],
        cfg.dtype,
        cfg.save_logvar,
        {
            "fingerprint": fp,
            "vae_checkpoint": str(ckpt.resolve()),
            "config": asdict(cfg),
            "package_version": package_version(),
        },
    )
    with writer_lock(cfg.out, f"--out {cfg.out!r}"):  # the driver's; Ray workers only write shards
        store = open_or_create(LatentStore, cfg.out, fp, cfg.overwrite, layout)
        return _encode(cfg, features, store, ckpt, sha)


def _encode(
    cfg: EncodeConfig, features: FeatureStore, store: LatentStore, ckpt: Path, sha: str
) -> dict:
    """Encode the shards still to do and finalize the store."""
    todo = store.todo()
    job = ShardJob(read_shard, lambda s: (features.path, s), ShardEncoder, (cfg, str(ckpt), sha))
    placement = Placement(cfg.backend, cfg.workers, cfg.num_gpus_per_worker, cfg.ray_address)
    start, images = time.perf_counter(), 0
    with tqdm(
        total=features.num_images,
        initial=features.num_images - sum(s.stop - s.start for s in todo),
        unit="img",
        desc="encode-latents",
        disable=not cfg.progress,
    ) as bar:
        for _, n, _ in run_shards(job, todo, placement) if todo else ():
            images += n
            bar.update(n)
    if not store.attrs.get("complete"):
        store.finalize()
    seconds = time.perf_counter() - start
    return {
        "store": cfg.out,
        "images": features.num_images,
        "shards_run": len(todo),
        "images_run": images,
        "seconds": seconds,
    }
