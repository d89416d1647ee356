"""Bad data and damaged files are blamed on what they are, in one line (issue 13, defect 8):
a truncated checkpoint file names itself and the command that rewrites it; non-finite values are
never written to a store, and a non-finite training step caused by the data names the rows."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import flatdino.pipeline.extract as extract
from conftest import fake_feature_store, tiny_config
from flatdino.cli.main import app
from flatdino.pipeline.encode import EncodeConfig, encode_latents
from flatdino.pipeline.errors import FlatDinoError
from flatdino.pipeline.extract import extract_features
from flatdino.pipeline.feature_store import FeatureStore
from flatdino.trainers.train_vae import TrainVAEConfig, train_vae

FIXTURE = Path(__file__).parent / "fixtures" / "format-v2"
runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})


def one_line_error(result, *fragments: str) -> None:
    """Exit 1, a single `error:` line holding every fragment, no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["ema.safetensors", "latent_stats.safetensors", "flow.json"])
def test_sample_with_a_damaged_dit_file_is_one_line(tmp_path, name):
    dit = tmp_path / "dit"
    shutil.copytree(FIXTURE / "dit", dit)
    truncate(dit / "checkpoints" / name)
    result = runner.invoke(
        app,
        [
            "sample",
            "--dit",
            str(dit),
            "--out",
            str(tmp_path / "s"),
            "--vae",
            str(FIXTURE / "vae"),
            "--n",
            "2",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--no-progress",
        ],
    )
    one_line_error(result, name, "truncated or corrupt", "flatdino train-dit")
    assert not (tmp_path / "s").exists()


def test_encode_with_a_damaged_vae_is_one_line(tmp_path):
    vae = tmp_path / "vae"
    shutil.copytree(FIXTURE / "vae", vae)
    truncate(vae / "checkpoints" / "model.safetensors")
    result = runner.invoke(
        app,
        [
            "encode-latents",
            "--features",
            str(FIXTURE / "features.zarr"),
            "--vae",
            str(vae),
            "--out",
            str(tmp_path / "l.zarr"),
            "--backend",
            "local",
            "--no-progress",
        ],
    )
    one_line_error(result, "model.safetensors", "flatdino train-vae")


def test_resume_with_a_damaged_trainer_state_is_one_line(tmp_path):
    run = tmp_path / "dit"
    args = [
        "train-dit",
        "--latents",
        str(FIXTURE / "latents.zarr"),
        "--out",
        str(run),
        "--preset",
        "tiny",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert runner.invoke(app, [*args, "--steps", "2"]).exit_code == 0
    truncate(run / "checkpoints" / "trainer.pt")
    result = runner.invoke(app, [*args, "--steps", "4", "--resume"])
    one_line_error(result, "trainer.pt", "truncated or corrupt", "--resume-from")


def test_extract_refuses_to_write_non_finite_features(tmp_path, monkeypatch):
    real = extract.embed_views

    def overflowing(*args, **kwargs):  # float16 overflow or a broken backbone
        out, cls = real(*args, **kwargs)
        out[1, 0, 5, 3] = np.inf
        return out, cls

    out = tmp_path / "s.zarr"
    monkeypatch.setattr(extract, "embed_views", overflowing)
    with pytest.raises(FlatDinoError, match=r"not finite .* shard 0 \(rows 1\).*not written"):
        extract_features(tiny_config("digits", out, split="val"))
    assert not FeatureStore(out).done_mask().any()  # nothing marked done: a re-run redoes it
    monkeypatch.setattr(extract, "embed_views", real)
    extract_features(tiny_config("digits", out, split="val"))
    assert FeatureStore(out).attrs["complete"]


def test_encode_refuses_to_write_non_finite_latents(tmp_path):
    features = fake_feature_store(tmp_path / "f.zarr", channels=64)
    FeatureStore(features, mode="r+").features[2, 0, 7] = np.nan
    with pytest.raises(FlatDinoError, match=r"latents \(mu\) are not finite .*rows 2\)"):
        encode_latents(
            EncodeConfig(
                features=str(features),
                vae=str(FIXTURE / "vae"),
                out=str(tmp_path / "l.zarr"),
                backend="local",
                device="cpu",
                progress=False,
            )
        )


def test_a_non_finite_step_from_the_data_names_the_rows(tmp_path):
    features = fake_feature_store(tmp_path / "f.zarr", channels=64)
    FeatureStore(features, mode="r+").features[2, 0, 0, 0] = np.nan
    with pytest.raises(FlatDinoError, match=r"holds NaN or inf in row\(s\) 2,.*extract-features"):
        train_vae(
            TrainVAEConfig(
                features=str(features),
                out=str(tmp_path / "vae"),
                preset="tiny",
                steps=2,
                batch_size=4,
                num_workers=0,
                device="cpu",
                progress=False,
            )
        )
