"""`flatdino sweep-cfg`: every cell is the run `flatdino sample` makes with that guidance (same
noise, same FD), w = 1 once, resumable, refusals in one line; on a tiny chain trained on the digits."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flatdino.cli.main import app
from flatdino.eval.fid import FidConfig, frechet_distance, load_set
from flatdino.eval.sweep import SweepConfig
from flatdino.pipeline.errors import FlatDinoError

runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})
# the raw weights: after 5 steps the EMA ones are still the zero-initialised output layer (v = 0)
FAST = ["--no-ema", "--steps", "4", "--batch-size", "32", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def _app_built_once():
    """typer turns the whole app into a click command on every CliRunner.invoke (seconds on two
    busy cores, most of this file's time); build it once, as the console script does per process."""
    import typer.main
    import typer.testing

    built = typer.main.get_command(app)
    with mock.patch.object(
        typer.testing, "_get_command", lambda a: built if a is app else typer.main.get_command(a)
    ):
        yield


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """The sampler's inputs, built through the CLI on the digits with tiny presets (as in
    test_sample.py); train-dit's default class dropout lets the DiT be guided."""
    from conftest import build_chain

    # lr 1e-2: after 5 steps at the default the guided cells' FDs differ by only ~1e-8
    return build_chain(tmp_path_factory.mktemp("chain"), invoke, ("--steps", "5", "--lr", "1e-2"))


def read_csv(path: Path) -> dict[tuple[float, float], dict[str, float]]:
    with open(path, newline="") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return {(r["cfg"], r["interval_start"]): r for r in rows}


def printed_best(output: str) -> tuple[float, float]:
    (match,) = re.findall(r"^best: --cfg (\S+) --cfg-interval (\S+),1 ", output, re.M)
    return float(match[0]), float(match[1])


def test_cells_are_sample_runs_from_the_same_noise_and_a_rerun_skips_them(
    chain, tmp_path, monkeypatch
):
    out = tmp_path / "sweep"
    # κ = 3, 4 steps: t = 0, 0.1, 0.25, 0.5, so start 0.3 guides only the last step
    args = [
        "sweep-cfg",
        "--dit",
        chain / "dit",
        "--features",
        chain / "features.zarr",
        "--out",
        out,
        "--scales",
        "1,2",
        "--interval-starts",
        "0,0.3",
        "--n",
        "80",
        *FAST,
    ]
    result = invoke(*args)
    assert "3 cells computed, 0 already in sweep.csv" in result.output  # w = 1 once
    rows = read_csv(out / "sweep.csv")
    assert sorted(rows) == [(1.0, 0.0), (1.0, 0.3), (2.0, 0.0), (2.0, 0.3)]
    fd = {k: r["fd_dinov2"] for k, r in rows.items()}
    assert fd[1.0, 0.0] == fd[1.0, 0.3]
    gaps = np.diff(sorted([fd[1.0, 0.0], fd[2.0, 0.0], fd[2.0, 0.3]]))
    assert gaps.min() > 1e-7 and all(v > 0 for v in fd.values())  # far above the 1e-9 below
    assert printed_best(result.output) == min(fd, key=fd.get)
    with Image.open(out / "heatmap.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
        im.load()
    record = json.loads((out / "sweep.json").read_text())
    assert record["reference"]["count"] == 359 and record["best"]["value"] == min(fd.values())

    dinov2 = FidConfig(real="", space="dinov2", progress=False)
    reference = load_set(str(chain / "features.zarr"), dinov2)
    for w, start in ((2.0, 0.3), (1.0, 0.0)):  # the same cells through `sample` and `eval fid`
        samples = tmp_path / f"sample-{w}-{start}"
        invoke(
            "sample",
            "--dit",
            chain / "dit",
            "--out",
            samples,
            "--cfg",
            w,
            "--cfg-interval",
            f"{start},1",
            "--n",
            "80",
            "--save-features",
            *FAST,
        )
        fake = load_set(str(samples / "features.npy"), dinov2)
        assert frechet_distance(reference.stats, fake.stats) == pytest.approx(
            fd[w, start], abs=1e-9
        )

    import flatdino.eval.sweep as sweep

    def no_sampling(*args, **kwargs):
        raise AssertionError("a finished cell was sampled again")

    monkeypatch.setattr(sweep, "generate", no_sampling)
    again = invoke(*args)
    assert "0 cells computed, 3 already in sweep.csv" in again.output
    assert read_csv(out / "sweep.csv") == rows and printed_best(again.output) == printed_best(
        result.output
    )


def test_an_interrupted_sweep_resumes_from_its_csv(chain, tmp_path, monkeypatch):
    import flatdino.eval.sweep as sweep

    cfg = SweepConfig(
        dit=str(chain / "dit"),
        features=str(chain / "features.zarr"),
        out=str(tmp_path / "sweep"),
        scales=(2.0, 3.0),
        interval_starts=(0.0,),
        n=8,
        steps=4,
        batch_size=32,
        ema=False,
        device="cpu",
        progress=False,
    )
    real, calls = sweep.measure, []

    def dies_on_the_second(*a, **k):
        calls.append(a[3:5])  # (w, start)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(sweep, "measure", dies_on_the_second)
        with pytest.raises(KeyboardInterrupt):
            sweep.sweep_cfg(cfg)
    assert calls == [(2.0, 0.0), (3.0, 0.0)]
    assert sorted(read_csv(tmp_path / "sweep" / "sweep.csv")) == [(2.0, 0.0)]
    summary = sweep.sweep_cfg(cfg)
    assert summary["cells_run"] == 1 and summary["cells_skipped"] == 1
    assert sorted(read_csv(tmp_path / "sweep" / "sweep.csv")) == [(2.0, 0.0), (3.0, 0.0)]


class PooledPixels(torch.nn.Module):
    """pytorch-fid's InceptionV3 interface ([features (B, D, 1, 1)] of [0, 1] images) at a
    fraction of its cost: the real network takes ~0.7 s per image on two busy CPU cores."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)[:, :, None, None]]


def test_fid_on_decoded_pixels_is_eval_fid_of_the_sample_run(chain, tmp_path, monkeypatch):
    """With --decoder: FID of the decoded uint8 pixels against the images of the store, the number
    `eval fid` gives for the samples.npz of the same `sample` run."""
    import flatdino.eval.feature_net as feature_net

    monkeypatch.setattr(feature_net, "inception_model", lambda weights: PooledPixels())
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"stand-in")
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    store = tmp_path / "small.zarr"
    invoke(
        "extract-features",
        "--data",
        folder.parent,
        "--backbone",
        "tiny",
        "--out",
        store,
        "--backend",
        "local",
        "--no-progress",
    )
    out = tmp_path / "sweep"
    result = invoke(
        "sweep-cfg",
        "--dit",
        chain / "dit",
        "--features",
        store,
        "--out",
        out,
        "--scales",
        "1,2",
        "--interval-starts",
        "0",
        "--n",
        "40",
        "--decoder",
        chain / "decoder",
        "--inception-weights",
        weights,
        *FAST,
    )
    rows = read_csv(out / "sweep.csv")
    fids = {k: r["fid"] for k, r in rows.items()}
    assert sorted(fids) == [(1.0, 0.0), (2.0, 0.0)] and fids[1.0, 0.0] != fids[2.0, 0.0]
    assert printed_best(result.output) == min(fids, key=fids.get) and "(fid " in result.output
    samples = tmp_path / "samples"
    invoke(
        "sample",
        "--dit",
        chain / "dit",
        "--out",
        samples,
        "--cfg",
        "2",
        "--cfg-interval",
        "0,1",
        "--n",
        "40",
        "--decoder",
        chain / "decoder",
        *FAST,
    )
    cfg = FidConfig(real="", space="inception", inception_weights=str(weights), progress=False)
    real, fake = load_set(str(store), cfg), load_set(str(samples / "samples.npz"), cfg)
    assert frechet_distance(real.stats, fake.stats) == pytest.approx(fids[2.0, 0.0], rel=1e-6)


def test_the_cli_builds_the_papers_grid_by_default(monkeypatch):
    import flatdino.eval.sweep as sweep

    seen = []
    monkeypatch.setattr(sweep, "sweep_cfg", lambda cfg: seen.append(cfg) or {})
    runner.invoke(app, ["sweep-cfg", "--dit", "d", "--features", "f", "--out", "o"])
    assert seen == [SweepConfig(dit="d", features="f", out="o")]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--scales", "0.5,2"], "must be >= 1"),
        (["--scales", ""], "--scales is empty"),
        (["--scales", "2,x"], "comma-separated numbers"),
        (["--interval-starts", "0,1.5"], "must be in [0, 1]"),
        (["--scales", "1.5,2,1.5"], "--scales 1.5,2,1.5 lists a value twice"),
        (["--interval-starts", "0,nan"], "holds a value that is not finite"),
        (["--inception-weights", "w.pth"], "needs --decoder"),
        (
            ["--features", "WRONG_STORE"],
            "holds (256, 32) patch features but the VAE decodes (256, 64)",
        ),
        (["--dit", "NO_DROPOUT"], "without class dropout"),
        (["--out", "NOT_A_SWEEP"], "not a sweep"),
        (["--seed", "1"], "another config (seed differ)"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(chain, tmp_path, options, message):
    import shutil

    from conftest import fake_feature_store

    if "WRONG_STORE" in options:
        options = ["--features", fake_feature_store(tmp_path / "c32.zarr", channels=32)]
    if "NO_DROPOUT" in options:  # the same DiT, recorded as trained without class dropout
        shutil.copytree(chain / "dit", tmp_path / "dit")
        for flow in (tmp_path / "dit").rglob("flow.json"):
            flow.write_text(json.dumps({**json.loads(flow.read_text()), "class_dropout": 0.0}))
        options = ["--dit", tmp_path / "dit"]
    if "NOT_A_SWEEP" in options:
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "thesis.tex").write_text("keep me")
        options = ["--out", tmp_path / "mine"]
    base = {
        "--dit": chain / "dit",
        "--features": chain / "features.zarr",
        "--out": tmp_path / "s",
        "--scales": "2",
        "--interval-starts": "0",
        "--n": "4",
    }
    if "--seed" in options:  # a finished sweep of seed 0 in --out first
        invoke("sweep-cfg", *[x for kv in base.items() for x in kv], *FAST)
    base.update(zip(options[::2], options[1::2], strict=True))
    args = [str(x) for kv in base.items() for x in kv]
    result = runner.invoke(app, ["sweep-cfg", *args, *FAST])
    assert result.exit_code == 1, result.output
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
    if "--seed" in options:  # --overwrite replaces it
        assert runner.invoke(app, ["sweep-cfg", *args, *FAST, "--overwrite"]).exit_code == 0
        assert json.loads((tmp_path / "s" / "sweep.json").read_text())["config"]["seed"] == 1


def test_the_python_api_refuses_what_the_cli_options_bound():
    """typer checks --n, --steps and --batch-size at the command line; `sweep_cfg(cfg)` called
    from Python checks them itself."""
    from dataclasses import replace

    from flatdino.eval.sweep import check_config

    cfg = SweepConfig(dit="d", features="f", out="o")
    check_config(cfg)
    for bad in ({"n": 1}, {"steps": 0}, {"batch_size": 0}):
        with pytest.raises(FlatDinoError, match=r"--n must be at least 2 \(a covariance\)"):
            check_config(replace(cfg, **bad))
