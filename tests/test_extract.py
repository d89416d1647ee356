"""The extract-features job: contents, determinism, Ray = local, resume after SIGKILL, bad input."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from conftest import assert_same_store, read_store, tiny_config
from flatdino.pipeline.backbone import load_backbone
from flatdino.pipeline.errors import FlatDinoError, StoreMismatchError, TooManyFailuresError
from flatdino.pipeline.extract import extract_features
from flatdino.pipeline.feature_store import FeatureStore
from flatdino.pipeline.preprocess import ViewRecipe, adm_center_crop, make_views, to_rgb
from flatdino.pipeline.sources import load_image, open_source


def test_store_contents_match_the_backbone(digits_val_store):
    arrays = read_store(digits_val_store)
    src = open_source("digits", "val")
    assert arrays["features"].shape == (359, 2, 256, 64) and arrays["features"].dtype == np.float16
    np.testing.assert_array_equal(arrays["labels"], src.labels)
    assert arrays["valid"].all() and arrays["done"].all() and len(arrays["done"]) == 23
    model, sha = load_backbone("tiny")
    for index in (0, 17, 358):  # first, inside a later shard, last row of the short last shard
        crop = adm_center_crop(to_rgb(load_image("digits", "", src.paths[index])), 256)
        with torch.no_grad():
            expected = model(make_views(crop, index, ViewRecipe(views=2))).numpy()
        np.testing.assert_allclose(arrays["features"][index], expected, rtol=2e-3, atol=2e-3)
    store = FeatureStore(digits_val_store)
    assert store.attrs["complete"] and store.attrs["fingerprint"]["weights_sha256"] == sha
    assert store.attrs["class_names"] == [str(d) for d in range(10)]
    manifest = store.manifest()
    assert manifest.column("status").to_pylist() == ["ok"] * 359
    assert manifest.column("path").to_pylist() == list(src.paths)


def test_rerun_of_a_finished_job_does_nothing(digits_val_store):
    before = {p: p.stat().st_mtime_ns for p in digits_val_store.rglob("*") if p.is_file()}
    summary = extract_features(tiny_config("digits", digits_val_store, split="val"))
    assert summary.shards_run == 0 and summary.images_run == 0
    after = {p: p.stat().st_mtime_ns for p in digits_val_store.rglob("*") if p.is_file()}
    assert before == after


@pytest.mark.parametrize(
    "change, reason",
    [({"views": 3}, "preprocessing"), ({"split": "train"}, "input"), ({"dtype": "bf16"}, "dtype")],
)
def test_other_settings_refuse_to_resume(digits_val_store, change, reason):
    cfg = dataclasses.replace(tiny_config("digits", digits_val_store, split="val"), **change)
    with pytest.raises(StoreMismatchError, match=f"{reason}.*--overwrite"):
        extract_features(cfg)


def test_overwrite_replaces_a_mismatched_store(tmp_path):
    out = tmp_path / "s.zarr"
    extract_features(tiny_config("digits", out, split="val", views=1))
    extract_features(tiny_config("digits", out, split="val", views=3, overwrite=True))
    assert read_store(out)["features"].shape == (359, 3, 256, 64)


def test_ray_backend_is_bit_identical_to_local(local_ray, digits_val_store, tmp_path):
    out = tmp_path / "ray.zarr"
    summary = extract_features(tiny_config("digits", out, split="val", backend="ray"))
    assert summary.shards_run == 23 and summary.images_run == 359
    assert_same_store(out, digits_val_store)


def test_a_worker_error_surfaces_as_one_clear_error(local_ray, tmp_path):
    cfg = tiny_config("digits", tmp_path / "gpu.zarr", split="val", backend="ray", device="cuda")
    with pytest.raises(FlatDinoError, match="no CUDA device") as info:
        extract_features(cfg)
    assert "Traceback" not in str(info.value) and len(str(info.value).splitlines()) == 1


def _start_job(out: Path) -> subprocess.Popen:
    args = ["extract-features", "--data", "digits", "--split", "val", "--out", str(out),
            "--backbone", "tiny", "--backend", "local", "--batch-size", "16",
            "--shard-size", "16", "--torch-threads", "2", "--no-progress"]  # fmt: skip
    cmd = [sys.executable, "-m", "flatdino.cli.main", *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _done_count(out: Path) -> int:
    done = out / "done" / "c"
    return len(list(done.iterdir())) if done.exists() else 0


@pytest.mark.parametrize("kill_at", ["creating", "first-shard", "half"])
def test_sigkill_then_rerun_is_bit_identical(kill_at, digits_val_store, tmp_path):
    out = tmp_path / "killed.zarr"
    proc = _start_job(out)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if kill_at == "creating" and list(tmp_path.glob(".killed.zarr.creating-*")):
            break
        if kill_at == "first-shard" and _done_count(out) >= 1:
            break
        if kill_at == "half" and _done_count(out) >= 11:
            break
        time.sleep(0.002)
    assert proc.poll() is None, f"job ended before the kill point: {proc.stderr.read().decode()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Count what a reader sees, not chunk files: a kill can land while a chunk file is half written,
    # and then that shard is (correctly) not done.
    done_before = (
        int(np.asarray(zarr.open_group(str(out), mode="r")["done"][:]).sum())
        if (out / "zarr.json").exists()
        else 0
    )
    assert done_before < 23
    summary = extract_features(tiny_config("digits", out, split="val"))
    assert summary.shards_run == 23 - done_before  # only the missing shards ran
    assert_same_store(out, digits_val_store)
    assert not list(tmp_path.glob(".killed.zarr.*"))  # no leftovers of the interrupted creation


def test_bad_images_are_marked_invalid_and_never_stop_the_job(messy_folder, tmp_path):
    out = tmp_path / "messy.zarr"
    summary = extract_features(
        tiny_config(str(messy_folder), out, max_failed_fraction=0.25, shard_size=8)
    )
    assert summary.images == 16 and summary.failed == 3
    manifest = pq.read_table(out / "manifest.parquet").to_pydict()
    failed = {p for p, s in zip(manifest["path"], manifest["status"], strict=True) if s == "failed"}
    assert failed == {"b_odd/corrupt.jpg", "b_odd/text.png", "b_odd/truncated.jpg"}
    errors = dict(zip(manifest["path"], manifest["error"], strict=True))
    assert (
        errors["b_odd/truncated.jpg"].startswith("OSError") and errors["a_good/coffee.jpg"] is None
    )
    arrays = read_store(out)
    assert arrays["valid"].sum() == 13
    assert not arrays["features"][~arrays["valid"]].any()  # invalid rows stay zero
    ok = arrays["features"][arrays["valid"]].astype(np.float32)
    assert np.isfinite(ok).all() and (np.abs(ok).reshape(13, -1).max(1) > 0).all()
    rows = FeatureStore(out).valid_rows()
    assert rows.tolist() == np.flatnonzero(arrays["valid"]).tolist() and len(rows) == 13
    assert FeatureStore(out).valid_rows(5).tolist() == rows[:5].tolist()


def test_too_many_failures_raise_after_the_store_is_complete(messy_folder, tmp_path):
    out = tmp_path / "strict.zarr"
    with pytest.raises(TooManyFailuresError, match=r"3 of 16 .*--max-failed-fraction"):
        extract_features(tiny_config(str(messy_folder), out))
    store = FeatureStore(out)
    assert store.attrs["complete"] and store.done_mask().all()
    with pytest.raises(TooManyFailuresError):  # a rerun reports the same, runs nothing
        extract_features(tiny_config(str(messy_folder), out))


def test_overwrite_never_deletes_a_directory_that_is_not_a_store(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(StoreMismatchError, match="not a flatdino feature store"):
        extract_features(tiny_config("digits", precious, split="val", overwrite=True))
    assert (precious / "thesis.txt").read_text() == "do not delete"
