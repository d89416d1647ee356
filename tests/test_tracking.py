"""Watching a run: TensorBoard event files and W&B offline files read back, the grids of the three
trainers, FD-DINOv2 during train-dit, `info --plot`, and the refusals of --log-to."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flatdino.cli.main import app
from flatdino.trainers.pictures import FeaturePCA, tile

runner = CliRunner()


def invoke(*args, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    """The digits' val features (tiny backbone), a tiny VAE and its latents."""
    root = tmp_path_factory.mktemp("watch")
    invoke(
        "extract-features",
        "--data",
        "digits",
        "--split",
        "val",
        "--backbone",
        "tiny",
        "--out",
        root / "f.zarr",
        "--backend",
        "local",
        "--no-progress",
    )
    invoke(
        "train-vae",
        "--features",
        root / "f.zarr",
        "--out",
        root / "vae",
        "--preset",
        "tiny",
        "--steps",
        "4",
        "--batch-size",
        "32",
        "--num-workers",
        "0",
        "--no-progress",
        "--log-to",
        "none",
    )
    invoke(
        "encode-latents",
        "--features",
        root / "f.zarr",
        "--vae",
        root / "vae",
        "--out",
        root / "l.zarr",
        "--backend",
        "local",
        "--no-progress",
    )
    return root


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_holds_every_metric_and_the_vae_reconstruction_grid(stores, tmp_path):
    run = tmp_path / "vae"
    invoke(
        "train-vae",
        "--features",
        stores / "f.zarr",
        "--val-features",
        stores / "f.zarr",
        "--out",
        run,
        "--preset",
        "tiny",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--log-every",
        "1",
        "--batch-size",
        "32",
        "--num-workers",
        "0",
        "--lr",
        "1e-2",
        "--no-progress",
        "--log-to",
        "tensorboard",
    )
    acc = events(run / "tensorboard")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [e.step for e in acc.Scalars("loss")] == [r["step"] for r in logged] == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in logged])
    assert [e.step for e in acc.Scalars("val_mse")] == [2, 4]
    assert {"lr", "grad_norm", "val_rel_err"} <= set(acc.Tags()["scalars"])
    images = acc.Images("val/reconstructions")
    assert [e.step for e in images] == [2, 4]
    # 8 val images: features on top, reconstructions below, 64 px PCA colours, 2 px gaps
    assert (images[0].width, images[0].height) == (8 * 66 + 2, 2 * 66 + 2)
    saved = [
        np.asarray(Image.open(run / "grids" / f"val-reconstructions-000000{s}.png")) for s in (2, 4)
    ]
    assert saved[0].shape == (134, 530, 3)
    assert np.array_equal(saved[0][:67], saved[1][:67])  # the same fixed images on top
    assert not np.array_equal(saved[0][67:], saved[1][67:])  # reconstructions change with training
    assert "wrote" in invoke("info", run, "--plot").output
    assert Image.open(run / "curves.png").size[0] > 800


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a W&B offline run file (LevelDB-style log of protobuf Records:
    a 7-byte file header, then chunks of crc32 (4), length (2), type (1) inside 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, rows, parts = 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        i.key or "/".join(i.nested_key): json.loads(i.value_json)
                        for i in record.history.item
                    }
                )
    return rows


def test_wandb_offline_without_a_login_and_fd_during_train_dit(stores, tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: never a login prompt
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "dit"
    common = [
        "train-dit",
        "--latents",
        stores / "l.zarr",
        "--out",
        run,
        "--preset",
        "tiny",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--no-progress",
        "--log-to",
        "wandb",
        "--lr",
        "1e-2",
        "--ema-decay",
        "0",
        "--log-every",
        "2",
        "--sample-every",
        "2",
        "--fd-samples",
        "40",
        "--sample-steps",
        "4",
        "--best-by-fd",
    ]
    invoke(*common, "--steps", "4")
    (offline,) = (run / "wandb").glob("offline-run-*")
    rows = wandb_history(next(offline.glob("run-*.wandb")))
    fd = {r["_step"]: r["fd_dinov2"] for r in rows if "fd_dinov2" in r}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert fd == pytest.approx({r["step"]: r["fd_dinov2"] for r in metrics if "fd_dinov2" in r})
    assert sorted(fd) == [2, 4] and all(np.isfinite(v) and v > 0 for v in fd.values())
    assert fd[2] != fd[4]  # the samples follow the weights
    assert [r["samples/_type"] for r in rows if "samples/_type" in r] == ["image-file"] * 2
    grid = np.asarray(Image.open(run / "grids" / "samples-0000004.png"))
    assert grid.shape == (8 * 66 + 2, 8 * 66 + 2, 3)  # 8 classes x 8 samples, PCA colours
    assert not np.array_equal(grid, np.asarray(Image.open(run / "grids" / "samples-0000002.png")))
    import torch

    state = torch.load(run / "checkpoints" / "trainer.pt", weights_only=False)["state"]
    assert state["best_fd"] == pytest.approx(min(fd.values()))  # resumed with the run
    assert (run / "best" / "ema.safetensors").exists()
    invoke(
        "sample",
        "--dit",
        run / "best",
        "--out",
        tmp_path / "s",
        "--n",
        "2",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--no-progress",
    )  # best/ is a checkpoint `sample` takes
    run_id = (run / "wandb-id.txt").read_text()
    invoke(*common, "--steps", "6", "--resume")  # the same W&B run continues
    assert (run / "wandb-id.txt").read_text() == run_id
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_train_vae_draws_its_grid_through_a_pixel_decoder(stores, tmp_path):
    from flatdino.models.pixel_decoder import PixelDecoder, pixel_decoder_preset
    from flatdino.trainers.runner import Dist, save_checkpoint

    cfg = pixel_decoder_preset("tiny", in_dim=64)
    save_checkpoint(tmp_path / "dec", PixelDecoder(cfg), cfg.to_dict(), None, Dist())
    common = [
        "train-vae",
        "--features",
        stores / "f.zarr",
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--batch-size",
        "32",
        "--num-workers",
        "0",
        "--no-progress",
        "--log-to",
        "none",
        "--grid-images",
        "3",
    ]
    invoke(
        *common,
        "--val-features",
        stores / "f.zarr",
        "--out",
        tmp_path / "v",
        "--decoder",
        tmp_path / "dec",
    )
    grid = np.asarray(Image.open(tmp_path / "v" / "grids" / "val-reconstructions-0000002.png"))
    side = cfg.image_size
    assert grid.shape == (2 * (side + 2) + 2, 3 * (side + 2) + 2, 3)  # pixels, not PCA colours
    refused = invoke(*common, "--out", tmp_path / "w", "--decoder", tmp_path / "dec", code=1)
    assert "give --val-features too" in refused.output and not (tmp_path / "w").exists()


def test_train_decoder_shows_reconstructions_beside_their_targets(stores, tmp_path):
    run = tmp_path / "dec"
    invoke(
        "train-decoder",
        "--features",
        stores / "f.zarr",
        "--out",
        run,
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--grid-every",
        "1",
        "--grid-images",
        "4",
        "--batch-size",
        "8",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--log-to",
        "none",
    )
    grids = sorted((run / "grids").glob("reconstructions-*.png"))
    assert [g.name for g in grids] == ["reconstructions-0000001.png", "reconstructions-0000002.png"]
    a, b = (np.asarray(Image.open(g)) for g in grids)
    side = (a.shape[0] - 2) // 2 - 2  # two rows of images of the decoder's size
    assert a.shape == (2 * (side + 2) + 2, 4 * (side + 2) + 2, 3)
    assert np.array_equal(a[: side + 3], b[: side + 3]) and not np.array_equal(a, b)
    assert not (run / "tensorboard").exists()


def test_a_missing_backend_is_one_line_before_anything_is_written(stores, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    result = invoke(
        "train-dit",
        "--latents",
        stores / "l.zarr",
        "--out",
        tmp_path / "r",
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--log-to",
        "wandb",
        code=1,
    )
    assert "pip install 'flatdino[wandb]'" in result.output and not (tmp_path / "r").exists()
    from flatdino.trainers.tracking import resolve_log_to

    assert resolve_log_to("auto") == "tensorboard"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert resolve_log_to("auto") == "none"
    result = invoke(
        "train-dit",
        "--latents",
        stores / "l.zarr",
        "--out",
        tmp_path / "r",
        "--steps",
        "2",
        "--log-to",
        "mlflow",
        code=1,
    )
    assert "--log-to must be one of auto, tensorboard, wandb, none" in result.output


def test_feature_colours_are_fixed_by_the_reference_and_tiles_are_laid_out():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 16, 8)) * np.array([5, 3, 2, 1, 1, 1, 1, 1])  # 3 strong directions
    pca = FeaturePCA(ref, scale=2)
    a = pca(ref[:2])
    assert a.shape == (2, 8, 8, 3) and a.dtype == np.uint8
    assert np.array_equal(pca(ref[:2]), a)  # a fixed map: the same features, the same colours
    assert a.std() > 40  # the projection spreads over the colour range
    grid = tile(np.zeros((5, 3, 4, 3), np.uint8), cols=2, pad=1)
    assert grid.shape == (3 * 4 + 1, 2 * 5 + 1, 3) and grid[0, 0, 0] == 255 and grid[1, 1, 0] == 0
