"""encode-latents: contents equal the VAE encoder, statistics, resume, refusals, Ray = local."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import fake_feature_store
from flatdino.pipeline.checkpoints import load_vae, resolve_vae
from flatdino.pipeline.encode import EncodeConfig, encode_latents
from flatdino.pipeline.errors import FlatDinoError, StoreMismatchError
from flatdino.trainers.train_vae import TrainVAEConfig, train_vae


def _train(store: Path, out: Path, seed: int) -> Path:
    train_vae(
        TrainVAEConfig(
            features=str(store),
            out=str(out),
            preset="tiny",
            steps=2,
            batch_size=16,
            num_workers=0,
            seed=seed,
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="module")
def vae_run(digits_val_store, tmp_path_factory) -> Path:
    return _train(digits_val_store, tmp_path_factory.mktemp("vae") / "run", seed=0)


def cfg(features: Path, vae: Path, out: Path, **kw) -> EncodeConfig:
    base = EncodeConfig(
        features=str(features),
        vae=str(vae),
        out=str(out),
        backend="local",
        batch_size=64,
        progress=False,
    )
    return dataclasses.replace(base, **kw)


@pytest.fixture(scope="module")
def latents(digits_val_store, vae_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lat") / "latents.zarr"
    encode_latents(cfg(digits_val_store, vae_run, out, save_logvar=True))
    return out


def arrays(path: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    return {k: g[k][:] for k in ("mu", "labels", "valid", "done", "mu_mean", "mu_std")}


def test_latents_equal_the_encoder_on_every_view(latents, digits_val_store, vae_run):
    g = zarr.open_group(str(latents), mode="r")
    feats = zarr.open_group(str(digits_val_store), mode="r")
    model, sha = load_vae(resolve_vae(str(vae_run)))
    assert g["mu"].shape == (359, 2, 8, 16) and g["mu"].dtype == np.float32
    for row in (0, 200, 358):
        with torch.no_grad():
            mu, logvar = model.encode(torch.from_numpy(feats["features"][row]).float())  # (V, T, d)
        np.testing.assert_allclose(g["mu"][row], mu.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g["logvar"][row], logvar.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(g["labels"][:], feats["labels"][:])
    np.testing.assert_array_equal(g["valid"][:], feats["valid"][:])
    attrs = dict(g.attrs)
    assert attrs["complete"] and attrs["fingerprint"]["vae_sha256"] == sha
    assert attrs["fingerprint"]["features_fingerprint"] == dict(feats.attrs)["fingerprint"]


def test_statistics_of_mu(latents):
    a = arrays(latents)
    mu = a["mu"][a["valid"]].reshape(-1, 8, 16).astype(np.float64)
    np.testing.assert_allclose(a["mu_mean"], mu.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["mu_std"], mu.std(0), rtol=1e-4, atol=1e-6)


def test_rerun_does_nothing_and_another_vae_is_refused(
    latents, digits_val_store, vae_run, tmp_path
):
    summary = encode_latents(cfg(digits_val_store, vae_run, latents, save_logvar=True))
    assert summary["shards_run"] == 0
    other = _train(digits_val_store, tmp_path / "other", seed=1)
    with pytest.raises(StoreMismatchError, match="vae_sha256.*--overwrite"):
        encode_latents(cfg(digits_val_store, other, latents, save_logvar=True))


def test_a_vae_for_other_features_is_refused(vae_run, digits_val_store, tmp_path):
    store = fake_feature_store(tmp_path / "c32.zarr", 32)
    with pytest.raises(FlatDinoError, match=r"expects \(P, C\) = \(256, 64\).*\(256, 32\)"):
        encode_latents(cfg(store, vae_run, tmp_path / "l.zarr"))
    with pytest.raises(FlatDinoError, match="--vae .* holds no checkpoint"):
        encode_latents(cfg(store, tmp_path, tmp_path / "l.zarr"))
    (tmp_path / "not-a-store").mkdir()
    (tmp_path / "not-a-store" / "file.txt").write_text("x")
    with pytest.raises(StoreMismatchError, match="not a flatdino latents store"):
        encode_latents(cfg(digits_val_store, vae_run, tmp_path / "not-a-store"))


def test_bf16_encoding_is_close_to_fp32_and_a_bad_precision_is_refused(
    latents, digits_val_store, vae_run, tmp_path
):
    encode_latents(cfg(digits_val_store, vae_run, tmp_path / "bf16.zarr", precision="bf16"))
    full, half = arrays(latents)["mu"], arrays(tmp_path / "bf16.zarr")["mu"]
    assert half.dtype == np.float32 and not np.array_equal(half, full)
    assert np.linalg.norm(half - full) / np.linalg.norm(full) < 0.02  # bf16: ~3 significant digits
    with pytest.raises(FlatDinoError, match="--precision must be one of auto, bf16, fp32"):
        encode_latents(cfg(digits_val_store, vae_run, tmp_path / "x.zarr", precision="half"))
    with pytest.raises(StoreMismatchError, match="precision"):  # never finished in another one
        encode_latents(cfg(digits_val_store, vae_run, tmp_path / "bf16.zarr", precision="fp32"))


def test_ray_is_bit_identical_to_local(local_ray, latents, digits_val_store, vae_run, tmp_path):
    out = tmp_path / "ray.zarr"
    encode_latents(cfg(digits_val_store, vae_run, out, save_logvar=True, backend="ray"))
    a, b = arrays(latents), arrays(out)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_sigkill_then_rerun_is_bit_identical(latents, digits_val_store, vae_run, tmp_path):
    out = tmp_path / "killed.zarr"
    cmd = [
        sys.executable,
        "-m",
        "flatdino.cli.main",
        "encode-latents",
        "--features",
        str(digits_val_store),
        "--vae",
        str(vae_run),
        "--out",
        str(out),
        "--backend",
        "local",
        "--batch-size",
        "64",
        "--save-logvar",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "done" / "c").exists() and len(list((out / "done" / "c").iterdir())) >= 1:
            break
        time.sleep(0.002)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = int(zarr.open_group(str(out), mode="r")["done"][:].sum())  # what a reader sees
    summary = encode_latents(cfg(digits_val_store, vae_run, out, save_logvar=True))
    assert summary["shards_run"] == 23 - done_before  # only the missing shards ran
    a, b = arrays(latents), arrays(out)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
