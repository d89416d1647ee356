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

from conftest import assert_same_store, fake_feature_store, read_store, tiny_config
from flatdino.pipeline.backbone import load_backbone
from flatdino.pipeline.errors import FlatDinoError, StoreMismatchError, TooManyFailuresError
from flatdino.pipeline.extract import extract_features
from flatdino.pipeline.feature_store import FeatureStore
from flatdino.pipeline.preprocess import ViewRecipe, adm_center_crop, make_views, to_rgb
from flatdino.pipeline.sources import load_image, open_source
from flatdino.pipeline.storage import Location, open_group


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


def _features_from_shipped_views(cfg, valid: np.ndarray) -> np.ndarray:
    """The path before crops were shipped: `make_views` per image on the decoding CPU, the shard's
    (n_ok*V) views flattened and cut into backbone batches of `cfg.batch_size`, float16 out."""
    src = open_source(cfg.data, cfg.split)
    recipe = ViewRecipe(views=cfg.views, seed=cfg.view_seed)
    model, _ = load_backbone(cfg.backbone)
    feats = np.zeros((len(src), cfg.views, model.num_patches, model.dim), np.float16)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.torch_threads)  # the job's thread count: the same matmul rounding
    try:
        for start in range(0, len(src), cfg.shard_size):
            rows = [i for i in range(start, min(start + cfg.shard_size, len(src))) if valid[i]]
            views = []
            for i in rows:
                crop = adm_center_crop(to_rgb(load_image(src.kind, src.root, src.paths[i])), 256)
                views.append(make_views(crop, i, recipe))
            flat = torch.stack(views).flatten(0, 1)  # (n_ok*V, 3, 224, 224)
            with torch.inference_mode():
                out = torch.cat(
                    [
                        model(flat[j : j + cfg.batch_size])
                        for j in range(0, len(flat), cfg.batch_size)
                    ]
                )
            feats[rows] = out.numpy().astype(np.float16).reshape(len(rows), *feats.shape[1:])
    finally:
        torch.set_num_threads(threads)
    return feats


def test_views_made_by_the_worker_equal_the_shipped_views(digits_val_store, messy_folder, tmp_path):
    """Shipping uint8 crops and making the views in the worker (batched, on its device) writes the
    same features as shipping make_views' float32 views did: bound 0 (bit-identical float16) on
    CPU, for digits (V=2, batches of whole images) and the messy photos (V=3 with batch 16: images
    straddle batches; invalid rows shift the view seeds' indices)."""
    digits = tiny_config("digits", digits_val_store, split="val")
    arrays = read_store(digits_val_store)
    assert np.array_equal(arrays["features"], _features_from_shipped_views(digits, arrays["valid"]))
    messy = tiny_config(
        str(messy_folder), tmp_path / "m.zarr", views=3, shard_size=8, max_failed_fraction=0.25
    )
    extract_features(messy)
    arrays = read_store(tmp_path / "m.zarr")
    assert arrays["valid"].sum() == 13
    assert np.array_equal(arrays["features"], _features_from_shipped_views(messy, arrays["valid"]))


def test_rerun_of_a_finished_job_does_nothing(digits_val_store):
    before = {p: p.stat().st_mtime_ns for p in digits_val_store.rglob("*") if p.is_file()}
    summary = extract_features(tiny_config("digits", digits_val_store, split="val"))
    assert summary.shards_run == 0 and summary.images_run == 0
    after = {p: p.stat().st_mtime_ns for p in digits_val_store.rglob("*") if p.is_file()}
    assert before == after


def test_decode_tasks_per_cpu_changes_speed_not_the_store(digits_val_store, tmp_path):
    """Not in the fingerprint: a store resumes under another --decode-tasks-per-cpu; 0 is refused."""
    summary = extract_features(
        tiny_config("digits", digits_val_store, split="val", decode_per_cpu=3)
    )
    assert summary.shards_run == 0
    with pytest.raises(FlatDinoError, match="^--decode-tasks-per-cpu must be >= 1$"):
        extract_features(tiny_config("digits", tmp_path / "z.zarr", split="val", decode_per_cpu=0))
    assert not (tmp_path / "z.zarr").exists()


@pytest.mark.parametrize(
    "change, reason",
    [({"views": 3}, "preprocessing"), ({"split": "train"}, "input"), ({"dtype": "bf16"}, "dtype")],
)
def test_other_settings_refuse_to_resume(digits_val_store, change, reason):
    cfg = dataclasses.replace(tiny_config("digits", digits_val_store, split="val"), **change)
    with pytest.raises(StoreMismatchError, match=f"{reason}.*--overwrite"):
        extract_features(cfg)


def test_overwrite_replaces_a_mismatched_store(tmp_path):
    out = fake_feature_store(tmp_path / "s.zarr", channels=32)  # complete, another backbone's
    extract_features(tiny_config("digits", out, split="val", views=1, overwrite=True))
    assert read_store(out)["features"].shape == (359, 1, 256, 64)


def test_a_worker_error_surfaces_as_one_clear_error(local_ray, tmp_path):
    cfg = tiny_config("digits", tmp_path / "gpu.zarr", split="val", backend="ray", device="cuda")
    with pytest.raises(FlatDinoError, match="no CUDA device") as info:
        extract_features(cfg)
    assert "Traceback" not in str(info.value) and len(str(info.value).splitlines()) == 1


def start_job(out: Path | str) -> subprocess.Popen:
    """The CLI extraction of the digits' val split (23 shards), in a process of its own."""
    args = [
        "extract-features",
        "--data",
        "digits",
        "--split",
        "val",
        "--out",
        str(out),
        "--backbone",
        "tiny",
        "--backend",
        "local",
        "--batch-size",
        "16",
        "--shard-size",
        "16",
        "--torch-threads",
        "2",
        "--no-progress",
    ]
    cmd = [sys.executable, "-m", "flatdino.cli.main", *args]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def done_count(out: Path | str) -> int:
    """Done markers written so far (objects of the `done` array: a path or a URL)."""
    return len(Location(str(out)).keys("done/c"))


def creating(out: Path | str) -> bool:
    """The store exists and its creation has not finished (zarr.json says so)."""
    attrs = Location(str(out)).attrs()
    return bool(attrs and attrs.get("creating"))


def kill_and_resume(out: Path | str, kill_at: str, reference: Path) -> None:
    """SIGKILL the job at `kill_at`, run it again: only missing shards run, bit-identical."""
    proc = start_job(out)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if kill_at == "creating" and creating(out):
            break
        if kill_at == "first-shard" and done_count(out) >= 1:
            break
        if kill_at == "half" and done_count(out) >= 11:
            break
        time.sleep(0.002)
    assert proc.poll() is None, f"job ended before the kill point: {proc.stderr.read().decode()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Count what a reader sees, not chunk files: a kill can land while a chunk file is half written,
    # and then that shard is (correctly) not done.
    attrs = Location(str(out)).attrs()
    done_before = (
        int(np.asarray(open_group(out)["done"][:]).sum())
        if attrs and not attrs.get("creating")
        else 0
    )
    assert done_before < 23
    summary = extract_features(tiny_config("digits", out, split="val"))
    assert summary.shards_run == 23 - done_before  # only the missing shards ran
    assert_same_store(out, reference)
    assert not Location(str(out)).attrs()["creating"]


@pytest.mark.parametrize("kill_at", ["creating", "half"])  # "first-shard": on S3
def test_sigkill_then_rerun_is_bit_identical(kill_at, digits_val_store, tmp_path):
    kill_and_resume(tmp_path / "killed.zarr", kill_at, digits_val_store)
    assert not list(tmp_path.glob("killed.zarr/**/*.partial"))  # no half-written local file


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
