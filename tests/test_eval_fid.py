"""`flatdino eval fid`: the Fréchet distance's closed form, precision/recall, the sets it reads,
and a clear error (not a download) without the Inception weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flatdino.cli.main import app
from flatdino.eval.fid import (
    FidConfig,
    RunningStats,
    fid,
    frechet_distance,
    image_files,
    inception_model,
    load_set,
    precision_recall,
    statistics,
)
from flatdino.eval.knn import pooled
from flatdino.pipeline.errors import FlatDinoError, WeightsError
from flatdino.pipeline.preprocess import adm_center_crop, to_rgb
from flatdino.pipeline.sources import load_image, open_source


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance((mu1, np.diag(a)), (mu2, np.diag(b))) == pytest.approx(closed, rel=1e-6)
    x = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(frechet_distance(statistics(x), statistics(x))) < 1e-6


def test_near_singular_covariances_get_the_standard_fix_and_the_known_answer():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 12))
    sigma = basis.T @ basis  # rank 3 of 12: sqrtm(sigma @ sigma) is singular
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    # Equal covariances: the trace terms cancel, FD = |mu1 - mu2|^2 (up to the eps offset)
    fd = frechet_distance((mu1, sigma), (mu2, sigma))
    assert fd == pytest.approx(np.sum((mu1 - mu2) ** 2), abs=1e-3)
    few = rng.normal(size=(5, 40))  # fewer samples than dims: a singular sample covariance
    assert abs(frechet_distance(statistics(few), statistics(few))) < 1e-3


def test_streamed_statistics_equal_numpy_in_float64():
    x = np.random.default_rng(0).normal(loc=3.0, size=(1000, 16)).astype(np.float32)
    acc = RunningStats(16)
    for i in range(0, 1000, 64):
        acc.add(x[i : i + 64])
    mu, sigma = acc.result()
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12
    )


def dense_precision_recall(real, fake, k=3):
    """The textbook version with whole N x N matrices (the reference of the chunked one)."""
    r, f = torch.from_numpy(real).float(), torch.from_numpy(fake).float()
    rr, rf = (
        torch.cdist(r, r).kthvalue(k + 1, 1).values,
        torch.cdist(f, f).kthvalue(k + 1, 1).values,
    )
    return {
        "precision": (torch.cdist(f, r) <= rr[None]).any(1).double().mean().item(),
        "recall": (torch.cdist(r, f) <= rf[None]).any(1).double().mean().item(),
        "k": k,
    }


def test_precision_recall_in_blocks_equals_the_dense_one_and_never_holds_n_squared(monkeypatch):
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(300, 8)), rng.normal(size=(250, 8)) * 1.3 + 0.2
    expected = dense_precision_recall(real, fake)
    assert 0.2 < expected["precision"] < 1.0 and 0.2 < expected["recall"] < 1.0  # not trivial
    largest = [0]
    cdist = torch.cdist

    def recording(a, b, *args, **kwargs):
        out = cdist(a, b, *args, **kwargs)
        largest[0] = max(largest[0], out.numel())
        return out

    monkeypatch.setattr(torch, "cdist", recording)
    budget = 4 * 300 * 16  # 16 rows of 300 float32 distances per block
    assert precision_recall(real, fake, budget=budget) == expected
    assert largest[0] <= 16 * 300 < 250 * 300
    same = precision_recall(real, real.copy(), budget=budget)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    far = precision_recall(real, rng.normal(size=(200, 8)) + 100.0, budget=budget)
    assert far["precision"] == 0.0 and far["recall"] == 0.0


def _cfg(**kw) -> FidConfig:
    return FidConfig(
        **{
            "real": "",
            "fake": "",
            "space": "dinov2",
            "backbone": "tiny",
            "device": "cpu",
            "progress": False,
            "batch_size": 5,
            **kw,
        }
    )


def test_images_pass_through_the_same_view_0_as_extract_features(digits_val_store, tmp_path):
    source = open_source("digits", "val")
    crops = []
    for path in source.paths[:12]:
        with load_image("digits", "", path) as img:
            crops.append(adm_center_crop(to_rgb(img), 256))
    np.savez(tmp_path / "samples.npz", arr_0=np.stack(crops), labels=np.zeros(12))
    s = load_set(
        str(tmp_path / "samples.npz"), _cfg(precision_recall=True)
    )  # read 5 rows at a time
    stored = pooled(str(digits_val_store))[0][:12]
    assert s.count == 12 and s.failed == 0
    np.testing.assert_allclose(s.vectors, stored, atol=2e-2)  # the store keeps float16
    assert s.identity["network"] == "tiny" and s.identity["crop"] == 256


def _mixed_folder(root: Path) -> list[np.ndarray]:
    """An ImageFolder tree of mixed sizes, modes and formats (nested), with one broken file."""
    from skimage import data

    images = [data.astronaut(), data.camera(), data.coffee(), data.chelsea(), data.rocket()]
    arrays = []
    for i, im in enumerate(images):
        folder = root / f"class{i % 2}" / ("deeper" if i == 4 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(folder / f"im{i}.{'jpg' if i == 2 else 'png'}")
        arrays.append(np.asarray(Image.open(folder / f"im{i}.{'jpg' if i == 2 else 'png'}")))
    (root / "class1" / "broken.png").write_bytes(b"not a png")
    (root / "class1" / "notes.txt").write_text("not an image")
    return arrays


def test_an_image_tree_of_mixed_sizes_and_a_manifest_give_the_same_statistics(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _mixed_folder(tmp_path / "tree")
    files = image_files(tmp_path / "tree")
    names = [str(Path(f).relative_to(tmp_path / "tree")) for f in files]  # recursive, in walk order
    assert names == [
        "class0/im0.png",
        "class0/im2.jpg",
        "class0/deeper/im4.png",
        "class1/broken.png",
        "class1/im1.png",
        "class1/im3.png",
    ]
    with pytest.raises(
        FlatDinoError, match=r"1 of 6 images could not be read \(first: .*broken.png"
    ):
        load_set(str(tmp_path / "tree"), _cfg())  # 1/6 is above the default 1%
    tree = load_set(str(tmp_path / "tree"), _cfg(max_failed_fraction=0.2, precision_recall=True))
    assert tree.count == 5 and tree.failed == 1 and tree.vectors.shape == (5, 64)
    good = [f for f in files if "broken" not in f]
    pq.write_table(pa.table({"path": good, "label": [0] * 5}), tmp_path / "m.parquet")
    manifest = load_set(str(tmp_path / "m.parquet"), _cfg())
    assert manifest.failed == 0
    np.testing.assert_allclose(manifest.mu, tree.mu, rtol=1e-12)
    np.testing.assert_allclose(manifest.sigma, tree.sigma, rtol=1e-9, atol=1e-15)


def test_the_result_counts_unreadable_files_and_refuses_mismatched_sides(
    digits_val_store, tmp_path
):
    _mixed_folder(tmp_path / "tree")
    runner = CliRunner()
    common = ["--space", "dinov2", "--backbone", "tiny", "--device", "cpu", "--no-progress"]
    ok = runner.invoke(
        app,
        [
            "eval",
            "fid",
            "--real",
            str(digits_val_store),
            "--fake",
            str(tmp_path / "tree"),
            *common,
            "--max-failed-fraction",
            "0.2",
            "--save-stats",
            str(tmp_path / "ref.npz"),
            "--out",
            str(tmp_path / "r.json"),
        ],
    )
    assert ok.exit_code == 0, ok.output
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["fake_failed"] == 1 and r["fake_count"] == 5 and r["real_count"] == 359 and r["fd"] > 0
    # the saved statistics record how they were computed; a side computed otherwise is refused
    with np.load(tmp_path / "ref.npz") as z:
        meta = json.loads(str(z["meta"]))
        mu, sigma = z["mu"], z["sigma"]
    assert meta["identity"]["network"] == "tiny" and meta["count"] == 359
    alone = runner.invoke(
        app,
        [
            "eval",
            "fid",
            "--real",
            str(digits_val_store),
            *common,
            "--save-stats",
            str(tmp_path / "alone.npz"),
        ],
    )
    assert alone.exit_code == 0 and "real_count=359" in alone.output
    with np.load(tmp_path / "alone.npz") as z:
        np.testing.assert_array_equal(z["sigma"], sigma)
    nothing = runner.invoke(app, ["eval", "fid", "--real", str(digits_val_store), *common])
    assert nothing.exit_code == 1 and "give --fake" in nothing.output
    meta["identity"]["crop"] = 224
    np.savez(tmp_path / "other.npz", mu=mu, sigma=sigma, meta=np.array(json.dumps(meta)))
    refused = runner.invoke(
        app,
        [
            "eval",
            "fid",
            "--real",
            str(tmp_path / "other.npz"),
            "--fake",
            str(digits_val_store),
            *common,
        ],
    )
    assert refused.exit_code == 1
    assert "computed differently: crop 224 for" in refused.output and "256 for" in refused.output
    other_weights = runner.invoke(
        app,
        [
            "eval",
            "fid",
            "--real",
            str(tmp_path / "ref.npz"),
            "--fake",
            str(tmp_path / "tree"),
            *common[:2],
            "--backbone",
            "tiny",
            "--weights",
            str(_reseeded_tiny(tmp_path)),
            "--device",
            "cpu",
            "--max-failed-fraction",
            "0.2",
            "--no-progress",
        ],
    )
    assert (
        other_weights.exit_code == 1
        and "computed differently: weights_sha256" in other_weights.output
    )


def _reseeded_tiny(tmp_path: Path) -> Path:
    """The tiny backbone's weights, perturbed: the same network with other weights."""
    from safetensors.torch import save_file

    from flatdino.pipeline.backbone import load_backbone

    vit = load_backbone("tiny")[0].vit
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in vit.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "tiny2.safetensors")
    return tmp_path / "tiny2.safetensors"


@pytest.mark.slow  # random-weight Inception on 359 images: ~35 s on 2 cores
def test_inception_space_reads_the_images_a_store_came_from(
    digits_val_store, inception_weights, tmp_path
):
    cfg = FidConfig(
        real=str(digits_val_store),
        space="inception",
        device="cpu",
        progress=False,
        inception_weights=str(inception_weights),
        batch_size=32,
    )
    store = load_set(str(digits_val_store), cfg)
    assert store.count == 359 and store.mu.shape == (2048,) and np.isfinite(store.sigma).all()
    assert store.identity["network"].startswith("pytorch-fid InceptionV3")
    assert store.identity["input_size"] == 299 and store.identity["crop"] == 256


def test_missing_inception_weights_are_an_error_not_a_download(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))  # an empty cache
    try:
        with pytest.raises(WeightsError, match="--inception-weights"):
            inception_model(None)
    finally:
        torch.hub.set_dir(old)


def test_command_on_stores_and_saved_statistics(digits_val_store, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "eval",
            "fid",
            "--real",
            str(digits_val_store),
            "--fake",
            str(digits_val_store),
            "--space",
            "dinov2",
            "--save-stats",
            str(tmp_path / "ref.npz"),
            "--precision-recall",
            "--out",
            str(tmp_path / "fd.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    fd = json.loads((tmp_path / "fd.json").read_text())
    assert abs(fd["fd"]) < 1e-6 and fd["precision"] == 1.0 and fd["recall"] == 1.0
    again = runner.invoke(
        app,
        [
            "eval",
            "fid",
            "--real",
            str(tmp_path / "ref.npz"),
            "--fake",
            str(digits_val_store),
            "--space",
            "dinov2",
        ],
    )
    assert again.exit_code == 0 and "fd=" in again.output
    assert abs(float(again.output.split("fd=")[1].split()[0])) < 1e-4


def test_rfid_command_separates_the_vaes_cost(digits_val_store, tmp_path):
    from flatdino.models.pixel_decoder import PixelDecoder, pixel_decoder_preset
    from flatdino.trainers.runner import Dist, save_checkpoint
    from flatdino.trainers.train_vae import TrainVAEConfig, train_vae

    train_vae(
        TrainVAEConfig(
            features=str(digits_val_store),
            out=str(tmp_path / "vae"),
            preset="tiny",
            steps=2,
            batch_size=16,
            num_workers=0,
            progress=False,
        )
    )
    cfg = pixel_decoder_preset("tiny", in_dim=64)
    save_checkpoint(tmp_path / "dec", PixelDecoder(cfg), cfg.to_dict(), None, Dist())
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "rfid",
            "--features",
            str(digits_val_store),
            "--vae",
            str(tmp_path / "vae"),
            "--decoder",
            str(tmp_path / "dec"),
            "--space",
            "dinov2",
            "--backbone",
            "tiny",
            "--images",
            "12",
            "--out",
            str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["images"] == 12 and all(
        np.isfinite(r[k]) and r[k] >= -1e-6
        for k in ("rfid", "rfid_decoder_only", "fd_vae_vs_decoder_only")
    )


def test_images_are_decoded_a_bounded_number_ahead():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from flatdino.eval.fid_sets import _bounded_map

    started, lock, most = [0], threading.Lock(), [0]
    consumed = [0]

    def work(i):
        with lock:
            started[0] += 1
            most[0] = max(most[0], started[0] - consumed[0])
        return i

    with ThreadPoolExecutor(4) as pool:
        out = []
        for f in _bounded_map(pool, work, range(1000), ahead=8):
            out.append(f.result())
            consumed[0] += 1
    assert out == list(range(1000)) and most[0] <= 9  # pool.map would run all 1000 ahead


def test_requests_are_checked_before_any_set_is_read(digits_val_store, tmp_path, monkeypatch):
    import flatdino.eval.fid as eval_fid

    def never(cfg):
        raise AssertionError("a feature network was built before the request was checked")

    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with monkeypatch.context() as m:
        m.setattr(eval_fid, "FeatureNet", never)
        for cfg, message in [
            (
                _cfg(real=str(digits_val_store), save_stats=str(tmp_path / "ref")),
                "must name a .npz",
            ),
            (
                _cfg(
                    real=str(digits_val_store),
                    fake=str(tmp_path / "ref.npz"),
                    precision_recall=True,
                ),
                "--fake .* is saved statistics",
            ),
            (
                _cfg(real=str(digits_val_store), fake=str(tmp_path / "none")),
                "--fake .* does not exist",
            ),
            (
                _cfg(real=str(tmp_path / "broken.npz"), fake=str(digits_val_store)),
                "is not a readable .npz",
            ),
        ]:
            with pytest.raises(FlatDinoError, match=message):
                fid(cfg)


def test_the_reference_is_saved_before_the_fake_side_fails(digits_val_store, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(FlatDinoError, match="1 of 1 images could not be read"):
        fid(
            _cfg(
                real=str(digits_val_store),
                fake=str(tmp_path / "bad"),
                save_stats=str(tmp_path / "ref.npz"),
            )
        )
    assert load_set(str(tmp_path / "ref.npz"), _cfg()).count == 359
    few = tmp_path / "few"
    few.mkdir()
    for i, im in enumerate(_mixed_folder(tmp_path / "tree")[:3]):
        Image.fromarray(im).save(few / f"{i}.png")
    with pytest.raises(FlatDinoError, match="more than k=3 samples per set; .*few' has 3"):
        fid(_cfg(real=str(digits_val_store), fake=str(few), precision_recall=True))


def test_an_unfinished_store_is_refused_and_a_symlink_loop_is_walked_once(
    digits_val_store, tmp_path
):
    import shutil

    import zarr

    shutil.copytree(digits_val_store, tmp_path / "part.zarr")
    zarr.open_group(str(tmp_path / "part.zarr"), mode="r+").attrs["complete"] = False
    with pytest.raises(FlatDinoError, match="part.zarr' is incomplete"):
        load_set(str(tmp_path / "part.zarr"), _cfg())
    _mixed_folder(tmp_path / "tree")
    before = image_files(tmp_path / "tree")
    (tmp_path / "tree" / "class0" / "loop").symlink_to(tmp_path / "tree")
    assert image_files(tmp_path / "tree") == before


def test_load_set_refuses_what_it_cannot_compare_in_one_line(tmp_path):
    """Each input `eval fid` cannot read is named with what it holds and what was expected; none
    of these builds the feature network."""
    from dataclasses import replace

    from conftest import fake_latents_store
    from flatdino.eval.fid_sets import npz_crop

    def no_net():
        raise AssertionError("the network is not needed to refuse")

    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    np.savez(tmp_path / "gray.npz", np.zeros((2, 8, 8), np.uint8))  # arr_0 without channels
    (tmp_path / "empty").mkdir()
    np.save(tmp_path / "flat.npy", np.zeros((4, 8), np.float32))
    (tmp_path / "notes.txt").write_text("hello")
    fake_latents_store(tmp_path / "l.zarr", np.zeros((4, 1, 2, 3), np.float32), np.zeros(4))
    cases = [
        ("missing.npz", _cfg(), "does not exist"),
        ("other.npz", _cfg(), "is neither a samples.npz (arr_0) nor saved statistics (mu, sigma)"),
        ("gray.npz", _cfg(), "arr_0 must be uint8 (N, H, W, 3) images; found uint8 (2, 8, 8)"),
        ("empty", _cfg(), "holds no images (.jpg"),
        ("flat.npy", _cfg(), "holds (4, 8); expected features (N, P, C)"),
        ("notes.txt", _cfg(), "is not an image folder, Parquet manifest, samples.npz, feature"),
        ("flat.npy", replace(_cfg(), space="inception"), "holds features: compare it with --space"),
        ("l.zarr", _cfg(), "is a flatdino.latents store; FD needs a feature store"),
    ]
    for name, cfg, message in cases:
        with pytest.raises(FlatDinoError) as err:
            load_set(str(tmp_path / name), cfg, no_net)
        assert message in str(err.value) and "\n" not in str(err.value), (name, err.value)
    big = np.random.default_rng(0).integers(0, 255, (300, 320, 3), np.uint8)
    square = big[:256, :256]
    assert npz_crop(big).shape == (256, 256, 3) and npz_crop(square) is square  # already cropped
