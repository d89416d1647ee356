"""The console script: commands listed, exit codes, one-line errors, info, and the built wheel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from flatdino.cli.main import app

runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})  # wide: rich truncates option names
MISSION = ("extract-features", "train-vae", "encode-latents", "train-dit", "sample")


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_every_mission_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in (*MISSION, "info"):
        assert name in result.output


def test_extract_features_help_explains_every_option():
    result = invoke("extract-features", "--help")
    assert result.exit_code == 0
    for option in (
        "--data",
        "--out",
        "--split",
        "--backbone",
        "--weights",
        "--views",
        "--batch-size",
        "--workers",
        "--num-gpus-per-worker",
        "--backend",
        "--ray-address",
        "--max-failed-fraction",
        "--overwrite",
        "--dtype",
        "--decode-tasks-per-cpu",
    ):
        assert option in result.output


def test_extract_features_builds_the_config_from_options(monkeypatch, tmp_path):
    import flatdino.pipeline.extract as extract

    seen = {}

    def fake(cfg):
        seen["cfg"] = cfg
        return extract.ExtractSummary(cfg.out, 10, 1, 1, images_run=10)

    monkeypatch.setattr(extract, "extract_features", fake)
    result = invoke(
        "extract-features",
        "--data",
        "digits",
        "--out",
        str(tmp_path / "s"),
        "--split",
        "train",
        "--views",
        "4",
        "--batch-size",
        "8",
        "--workers",
        "3",
        "--num-gpus-per-worker",
        "0.5",
        "--backend",
        "local",
        "--ray-address",
        "auto",
        "--max-failed-fraction",
        "0.2",
        "--overwrite",
        "--dtype",
        "bf16",
        "--weights",
        "w.pth",
        "--seed",
        "7",
        "--decode-tasks-per-cpu",
        "3",
    )
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.data, cfg.out, cfg.split, cfg.views, cfg.batch_size) == (
        "digits",
        str(tmp_path / "s"),
        "train",
        4,
        8,
    )
    assert (cfg.workers, cfg.num_gpus_per_worker, cfg.backend, cfg.ray_address) == (
        3,
        0.5,
        "local",
        "auto",
    )
    assert (cfg.max_failed_fraction, cfg.overwrite, cfg.dtype, cfg.weights, cfg.view_seed) == (
        0.2,
        True,
        "bf16",
        "w.pth",
        7,
    )
    assert cfg.backbone == "dinov2-vitb14-reg" and cfg.progress and cfg.decode_per_cpu == 3


@pytest.mark.parametrize("name", [*MISSION, "train-decoder", "info", "flops", "demo", "sweep-cfg"])
def test_every_command_explains_its_options(name):
    result = invoke(name, "--help")
    assert result.exit_code == 0 and "--help" in result.output
    command = typer.main.get_command(app).commands[name]
    options = [p for p in command.params if p.param_type_name == "option"]
    assert options and [p.name for p in options if not p.help] == []
    # plain help: no box, no type label beside a flag (a flag takes no value)
    assert "<bool>" not in result.output and "│" not in result.output


def test_help_keeps_square_brackets():
    result = invoke("import-official", "--help")
    assert "pip install 'flatdino[official]'" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("train-dit", "--latents", "a", "--out", "b", "--steps", "x"),
            "Invalid value for '--steps'",
        ),
        (("train-dit", "--bogus"), "No such option: --bogus"),
        (("eval", "knn", "--bogus"), "flatdino eval knn: No such option"),
        (("train-dit", "--out", "b"), "Missing option '--latents'"),
        (("no-such-command",), "No such command"),
    ],
)
def test_usage_errors_are_one_line_and_exit_1(args, message):
    """A bad option or value is a user error like the others: one red line, exit 1 (click's own
    is a block of lines and exit 2)."""
    result = invoke(*args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: flatdino") and message in lines[0]


def test_extract_then_info_then_rerun(tmp_path):
    out = tmp_path / "d.zarr"
    args = (
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
        "--no-progress",
    )
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "wrote 359 images in 6/6 shards, 0 failed" in result.output
    info = invoke("info", str(out))
    assert info.exit_code == 0
    assert "features   float16  shape=(359, 2, 256, 64)" in info.output
    assert "complete: True" in info.output and "valid: 359" in info.output
    again = invoke(*args)
    assert again.exit_code == 0 and "nothing to do" in again.output


@pytest.mark.parametrize(
    "args, message",
    [
        (("--data", "/no/such/dir"), "does not exist"),
        (("--data", "digits", "--weights", "/no/such.pth"), "--weights"),
    ],
)
def test_user_errors_are_one_line_and_exit_1(args, message, tmp_path):
    result = invoke(
        "extract-features",
        "--out",
        str(tmp_path / "o.zarr"),
        "--backbone",
        "tiny",
        "--backend",
        "local",
        *args,
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.output


def test_too_many_failures_exit_1_naming_the_option(messy_folder, tmp_path):
    result = invoke(
        "extract-features",
        "--data",
        str(messy_folder),
        "--out",
        str(tmp_path / "m"),
        "--backbone",
        "tiny",
        "--backend",
        "local",
        "--no-progress",
    )
    assert result.exit_code == 1 and "--max-failed-fraction" in result.output


def test_info_on_something_else_is_a_clear_error(tmp_path):
    result = invoke("info", str(tmp_path))
    assert result.exit_code == 1 and "not a Zarr store" in result.output


def test_plain_install_into_a_fresh_venv(tmp_path):
    """`pip install .` (not editable) into a new venv: `flatdino --help` works and only the
    `flatdino` namespace is installed. The dependencies (gigabytes) come from this venv by a plain
    path entry, which does not run its .pth files, so the editable install here cannot leak in."""
    import shutil
    import site
    import sysconfig

    # pip builds in the source folder (build/, *.egg-info): build from a copy, leave no trace
    root = tmp_path / "src"
    source = Path(__file__).resolve().parents[1]
    root.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(source / name, root / name)
    for layer in ("models", "pipeline", "trainers", "sampling", "eval", "cli"):
        shutil.copytree(source / layer, root / layer, ignore=shutil.ignore_patterns("__pycache__"))
    fresh = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(fresh)], check=True)
    fresh_site = Path(
        subprocess.check_output(
            [
                fresh / "bin" / "python",
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ],
            text=True,
        ).strip()
    )
    deps = site.getsitepackages()[0] if site.getsitepackages() else sysconfig.get_path("purelib")
    (fresh_site / "_flatdino_test_deps.pth").write_text(deps + "\n")
    subprocess.run(
        [
            fresh / "bin" / "python",
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            str(root),
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": deps},  # build with this venv's setuptools and pip
    )
    before = {"pip", "setuptools", "pkg_resources", "_distutils_hack", "_vendor"}
    installed = {
        p.name for p in fresh_site.iterdir() if not p.name.endswith((".dist-info", ".pth"))
    }
    assert installed - before == {"flatdino"}
    assert {p.name for p in (fresh_site / "flatdino").iterdir()} >= {"pipeline", "trainers", "cli"}
    probe = "import flatdino.pipeline, flatdino.cli, flatdino.trainers; print(flatdino.pipeline.__file__)"
    out = subprocess.run(
        [fresh / "bin" / "python", "-c", probe],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    )
    assert out.stdout.startswith(str(fresh_site / "flatdino"))
    help_ = subprocess.run(
        [fresh / "bin" / "flatdino", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert help_.returncode == 0, help_.stderr
    assert all(name in help_.stdout for name in MISSION)


def test_train_vae_runs_and_a_saved_config_is_overridden(digits_val_store, tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = (
        "train-vae",
        "--features",
        str(digits_val_store),
        "--out",
        str(run),
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--num-workers",
        "0",
        "--log-every",
        "1",
        "--lr",
        "3e-4",
        "--no-progress",
    )
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert (
        "done at step 2" in result.output and (run / "checkpoints" / "model.safetensors").exists()
    )
    info = invoke("info", str(run))
    assert info.exit_code == 0 and "'total': 287488" in info.output and "'step': 2" in info.output
    lat = tmp_path / "lat.zarr"
    enc = invoke(
        "encode-latents",
        "--features",
        str(digits_val_store),
        "--vae",
        str(run),
        "--out",
        str(lat),
        "--backend",
        "local",
        "--no-progress",
        "--dtype",
        "float16",
    )
    assert enc.exit_code == 0 and "encoded 359 images in 23 shards" in enc.output, enc.output
    lat_info = invoke("info", str(lat))
    assert (
        lat_info.exit_code == 0 and "mu         float16  shape=(359, 2, 8, 16)" in lat_info.output
    )
    assert "shards_done: 23/23" in lat_info.output and f"vae: {run.resolve()}" in lat_info.output
    dit = invoke(
        "train-dit",
        "--latents",
        str(lat),
        "--out",
        str(tmp_path / "dit"),
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert dit.exit_code == 0 and "done at step 2" in dit.output, dit.output
    again = invoke(
        "train-dit",
        "--latents",
        str(lat),
        "--out",
        str(tmp_path / "dit"),
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--no-progress",
        "--resume",
    )
    assert again.exit_code == 0 and "at step 2 already; nothing to do" in again.output
    info = invoke("info", str(tmp_path / "dit"))
    assert info.exit_code == 0 and "kind: dit" in info.output and "'latent_dim': 16" in info.output
    bad = invoke(
        "encode-latents",
        "--features",
        str(digits_val_store),
        "--vae",
        str(tmp_path),
        "--out",
        str(tmp_path / "x.zarr"),
        "--backend",
        "local",
    )
    assert bad.exit_code == 1 and "--vae" in bad.output and "holds no checkpoint" in bad.output
    import flatdino.trainers.train_vae as tv

    seen = {}

    def fake(cfg):
        seen["cfg"] = cfg
        return {"step": 0}

    monkeypatch.setattr(tv, "train_vae", fake)
    again = invoke(
        "train-vae",
        "--config",
        str(run / "config.json"),
        "--features",
        str(digits_val_store),
        "--out",
        str(tmp_path / "other"),
        "--steps",
        "5",
    )
    assert again.exit_code == 0, again.output
    cfg = seen["cfg"]
    assert (cfg.preset, cfg.lr, cfg.batch_size, cfg.num_workers) == ("tiny", 3e-4, 8, 0)  # saved
    assert (cfg.steps, cfg.out) == (5, str(tmp_path / "other"))  # typed on the command line


def test_train_vae_without_a_length_is_a_clear_error(digits_val_store, tmp_path):
    result = invoke(
        "train-vae",
        "--features",
        str(digits_val_store),
        "--out",
        str(tmp_path / "r"),
        "--preset",
        "tiny",
    )
    assert result.exit_code == 1 and "--steps N or --epochs E" in result.output


def test_train_dit_help_and_config(monkeypatch, tmp_path):
    result = invoke("train-dit", "--help")
    assert result.exit_code == 0
    for option in (
        "--latents",
        "--out",
        "--preset",
        "--steps",
        "--epochs",
        "--batch-size",
        "--micro-batch",
        "--lr",
        "--warmup-steps",
        "--ema-decay",
        "--kappa",
        "--time-dist",
        "--class-dropout",
        "--normalize",
        "--resume",
        "dit-xl (675.5M)",
    ):
        assert option in result.output, option
    bad = invoke(
        "train-dit", "--latents", str(tmp_path), "--out", str(tmp_path / "r2"), "--steps", "1"
    )
    assert bad.exit_code == 1 and "not a flatdino latents store" in bad.output
    import flatdino.trainers.train_dit as td

    seen = {}
    monkeypatch.setattr(td, "train_dit", lambda cfg: seen.update(cfg=cfg) or {"step": 0})
    ok = invoke(
        "train-dit",
        "--latents",
        "l.zarr",
        "--out",
        str(tmp_path / "r"),
        "--steps",
        "9",
        "--time-dist",
        "logit-normal",
        "--normalize",
        "--kappa",
        "1",
    )
    assert ok.exit_code == 0, ok.output
    cfg = seen["cfg"]
    paper = ("dit-xl", 1024, 2e-4, 0.9995, 0.1)
    assert (cfg.preset, cfg.batch_size, cfg.lr, cfg.ema_decay, cfg.class_dropout) == paper
    assert (cfg.steps, cfg.time_dist, cfg.normalize, cfg.kappa) == (9, "logit-normal", True, 1.0)


def test_info_as_json_on_stores_runs_and_presets_and_its_refusals(tmp_path):
    """`info --json` of a store and of a run folder, the preset table, and each refusal in one
    line: no path, --plot on a store, a run without metrics to plot, a config.json of no model."""
    import json

    from conftest import fake_feature_store
    from flatdino.models.configs import dit_preset

    store = fake_feature_store(tmp_path / "f.zarr", channels=8)
    got = json.loads(invoke("info", str(store), "--json").output)
    assert got["arrays"]["features"]["shape"] == [4, 1, 256, 8] and got["complete"] is True

    run = tmp_path / "dit"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": dit_preset("tiny").to_dict()}))
    got = json.loads(invoke("info", str(run), "--json").output)
    assert got["kind"] == "dit" and got["parameters"] > 0 and got["checkpoints"] == []

    table = invoke("info", "--presets").output.splitlines()
    assert table[0].split() == ["preset", "model", "parameters", "official", "code"]
    dit_xl = next(line.split() for line in table if line.startswith("dit-xl "))
    assert dit_xl[1] == "dit" and dit_xl[2] == dit_xl[3]  # equal to the official module's count

    for args, message in [
        ((), "info needs a store or run folder (or --presets)"),
        ((str(store), "--plot"), f"--plot draws a run's curves; {str(store)!r} is not a run"),
        ((str(run), "--plot"), f"{str(run)!r} has no metrics.jsonl to plot; pass a run folder"),
    ]:
        result = invoke("info", *args)
        assert result.exit_code != 0 and message in result.output, result.output
    (run / "config.json").write_text(json.dumps({"kappa": 3.0}))
    result = invoke("info", str(run))
    assert (
        result.exit_code != 0
        and "is a DiT's flow.json (it has kappa), not a run's" in result.output
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("eval", "knn", "--train", "a", "--train", "b", "--val", "c"), "give one --val per"),
        (("bench", "throughput", "--out", "t", "--batches", "1,x"), "--batches must be integers"),
    ],
)
def test_eval_and_bench_refuse_mismatched_lists_in_one_line(args, message):
    result = invoke(*args)
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_sample_from_python_refuses_what_the_cli_options_bound():
    from dataclasses import replace

    from flatdino.pipeline.errors import FlatDinoError
    from flatdino.sampling.configs import SampleConfig
    from flatdino.sampling.sample import sample

    cfg = SampleConfig(dit="d", out="o")
    for bad in ({"steps": 0}, {"batch_size": 0}, {"writers": 0}):
        with pytest.raises(FlatDinoError, match="--steps, --batch-size and --writers must be"):
            sample(replace(cfg, **bad))
