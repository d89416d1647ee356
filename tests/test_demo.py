"""`flatdino demo`: the judge, the state file (reuse, --fresh, changed settings) and the whole demo,
stopped by Ctrl-C and resumed (slow)."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from PIL import Image
from typer.testing import CliRunner

from flatdino.cli.demo_run import DemoConfig, Stage, _prepare, run_demo, run_stages
from flatdino.cli.main import app
from flatdino.eval.judge import digit_judge, judge
from flatdino.pipeline.errors import InputError
from flatdino.pipeline.sources import digits_split

runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})


def render(pixels: np.ndarray, size: int = 256) -> np.ndarray:
    """(N, 64) digits values 0..16 -> uint8 (N, size, size, 3), upscaled as the pipeline sees them."""
    out = []
    for p in pixels:
        grey = Image.fromarray(np.rint(p.reshape(8, 8) * 255 / 16).astype(np.uint8))
        out.append(np.asarray(grey.convert("RGB").resize((size, size), Image.BICUBIC)))
    return np.stack(out)


def test_the_judge_knows_real_digits_at_256_px_and_is_fooled_by_noise():
    clf, real_val = digit_judge()
    assert real_val > 0.93
    x, y = digits_split("val")
    assert judge(clf, render(x[:120]), y[:120])["accuracy"] > 0.9  # the 8×8 -> 256 -> 8×8 path
    noise = np.random.default_rng(0).integers(0, 256, (200, 64, 64, 3), dtype=np.uint8)
    labels = np.arange(200) % 10
    r = judge(clf, noise, labels)
    assert (
        r["accuracy"] < 0.3 and r["n"] == 200 and set(r["per_class"]) == {str(c) for c in range(10)}
    )


def test_a_foreign_folder_is_never_deleted(tmp_path):
    (tmp_path / "precious.txt").write_text("keep")
    with pytest.raises(InputError, match="not a demo folder"):
        run_demo(DemoConfig(out=str(tmp_path), fresh=True, progress=False))
    assert (tmp_path / "precious.txt").read_text() == "keep"


def test_fresh_starts_a_demo_folder_over(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo-state.json").write_text(
        json.dumps({"recipe": {}, "stages": {"a": {"done": True}}})
    )
    (out / "features-train.zarr").mkdir()
    state = run_stages(DemoConfig(out=str(out), fresh=True), [], echo=lambda _: None)
    assert state["stages"] == {} and not (out / "features-train.zarr").exists()


def test_the_state_file_exists_before_any_stage_writes(tmp_path):
    """A SIGKILL inside the first stage leaves a folder the next run (or --fresh) accepts."""
    out = tmp_path / "demo"
    cfg = DemoConfig(out=str(out))
    assert _prepare(cfg) == {"recipe": cfg.recipe(), "stages": {}}
    assert json.loads((out / "demo-state.json").read_text())["stages"] == {}
    (out / "features-train.zarr").mkdir()  # what a stage killed before its first record leaves
    assert run_stages(cfg, [], echo=lambda _: None)["stages"] == {}
    run_stages(dataclasses.replace(cfg, fresh=True), [], echo=lambda _: None)
    assert not (out / "features-train.zarr").exists()


def test_bad_out_and_a_broken_state_file_are_one_line_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        run_stages(DemoConfig(out=str(tmp_path / "file")), [])
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "demo-state.json").write_text("{half")
    with pytest.raises(InputError, match="unreadable.*--fresh"):
        run_stages(DemoConfig(out=str(tmp_path / "demo")), [])
    assert run_stages(DemoConfig(out=str(tmp_path / "demo"), fresh=True), [])["stages"] == {}


def test_changed_settings_need_fresh(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    state = {"recipe": DemoConfig(vae_steps=5).recipe(), "stages": {}}
    (out / "demo-state.json").write_text(json.dumps(state))
    with pytest.raises(InputError, match=r"other demo settings \(vae_steps\).*--fresh"):
        run_demo(DemoConfig(out=str(out), vae_steps=6, progress=False))
    result = runner.invoke(app, ["demo", "--out", str(out), "--vae-steps", "6", "--no-progress"])
    assert result.exit_code == 1 and "--fresh" in result.output


def test_an_interrupted_stage_is_resumed_and_keeps_its_time(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "demo-out"), progress=False)
    calls = []

    def stage(name: str, fail_once: bool = False) -> Stage:
        def run():
            calls.append(name)
            if fail_once and calls.count(name) == 1:
                time.sleep(0.05)
                raise KeyboardInterrupt
            return {"items": 10, "unit": "images"}

        return Stage(name, name, run)

    stages = [stage("a"), stage("b", fail_once=True), stage("c")]
    with pytest.raises(KeyboardInterrupt):
        run_stages(cfg, stages, echo=lambda _: None)
    state = json.loads((tmp_path / "demo-out" / "demo-state.json").read_text())
    assert state["stages"]["a"]["done"] and not state["stages"]["b"]["done"]
    assert state["stages"]["b"]["seconds"] >= 0.05 and "c" not in state["stages"]

    lines = []
    state = run_stages(cfg, stages, echo=lines.append)
    assert calls == ["a", "b", "b", "c"]  # a is reused, b re-entered, c run
    assert "done in an earlier run" in lines[0]
    assert all(state["stages"][k]["done"] for k in "abc")
    assert state["stages"]["b"]["seconds"] >= 0.05  # the interrupted attempt's time is kept


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 10-12 minutes on 2 cores; the suite's 300 s limit is per quick test
def test_the_demo_stopped_by_ctrl_c_resumes_meets_its_targets_and_reuses_every_stage(tmp_path):
    """`make demo` as a user lives it, in one demo run: Ctrl-C during train-vae after its first
    checkpoint; the same command resumes the VAE from step 100 (not from 0) and finishes with
    generated digits >= 90% and every output written with sane numbers; a third run reuses every
    stage. The VAE's validation error is held against the predict-the-train-mean baseline here
    (this run is the VAE's learning test too). Its time is reported, not gated."""
    c = DemoConfig()
    out = tmp_path / "demo-out"
    cmd = [sys.executable, "-m", "flatdino.cli.main", "demo", "--out", str(out), "--no-progress"]
    log = tmp_path / "first.log"
    # A job started in the background by a non-interactive shell (as CI may be) inherits an ignored
    # SIGINT, and Python then never raises KeyboardInterrupt: give the child the default, as a
    # terminal would.
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    with log.open("w") as sink:
        first = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=restore)
        ckpt = out / "runs" / "vae" / "checkpoints" / "trainer.pt"
        deadline = time.monotonic() + 600
        while not ckpt.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ckpt.exists(), log.read_text()
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) != 0, log.read_text()
    state = json.loads((out / "demo-state.json").read_text())
    assert state["stages"]["extract-val"]["done"] and not state["stages"]["train-vae"]["done"]

    result = runner.invoke(app, ["demo", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "extract-train: done in an earlier run" in result.output
    assert "resumed from" in (out / "runs" / "vae" / "log.txt").read_text()
    assert "generated digits recognised" in result.output
    for name in (
        "features-train.zarr",
        "features-val.zarr",
        "latents-train.zarr",
        "latents-val.zarr",
        "runs/vae/config.json",
        "runs/dit/checkpoints/ema.safetensors",
        "runs/decoder/config.json",
        "samples/grid.png",
        "samples/samples.npz",
        "ablation.png",
        "report.md",
        "report.json",
    ):
        assert (out / name).exists(), name
    r = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert list(r["stages"]) == [
        "extract-train",
        "extract-val",
        "train-vae",
        "encode-train",
        "encode-val",
        "train-decoder",
        "train-dit",
        "sample",
        "guidance",
        "evaluate",
    ]
    assert r["stages"]["extract-train"]["items"] == 1438
    assert r["stages"]["extract-val"]["items"] == 359
    assert r["stages"]["sample"]["items"] == 10 * c.per_class
    assert all(s["seconds"] > 0 for s in r["stages"].values())
    assert all(s["per_second"] > 0 for s in r["stages"].values() if "items" in s)
    assert r["stages"]["train-vae"]["attempts"] == 2 and "resumed: 2 attempts" in md
    assert 0.0 < r["vae_val_rel_err"] < 1.0  # below predicting zero
    train = zarr.open_group(str(out / "features-train.zarr"))["features"][:, 0]
    val = zarr.open_group(str(out / "features-val.zarr"))["features"][:, 0].astype(np.float32)
    baseline = np.sqrt(((val - train.astype(np.float32).mean(0)) ** 2).sum() / (val**2).sum())
    assert r["vae_val_rel_err"] < 0.75 * baseline  # the demo: 0.236 against 0.544
    knn = {k["space"]: k for k in r["knn"]}
    assert set(knn) == {"features", "latents"}
    assert knn["features"]["top1"] > 0.2  # 10 classes: chance is 0.1
    assert all(0.0 <= k["top1"] <= k["top5"] <= 1.0 for k in r["knn"])
    fd = r["fd_dinov2_space"]
    assert 0.0 <= fd["train_vs_val"] < fd["generated_vs_val"]
    g = r["generated"]
    assert g["n"] == 10 * c.per_class and g["accuracy"] >= 0.9, g  # the target
    assert r["vae_val_rel_err"] < 0.4
    assert g["judge_on_real_val_8x8"] > 0.93 and g["judge_on_val_crops"] > 0.9
    assert np.asarray(Image.open(out / "samples/grid.png")).ndim == 3
    assert f"{g['accuracy']:.1%}" in md and "train-vae" in md
    # watching: FD during training at c.watch_points points, the sweep, the samplers, AutoGuidance
    curve = r["fd_during_training"]
    assert len(curve) == c.watch_points and all(np.isfinite(v) for _, v in curve)
    assert len(list((out / "runs/dit/grids").glob("samples-*.png"))) == c.watch_points
    assert len((out / "sweep/sweep.csv").read_text().splitlines()) == 1 + 4 * 3
    assert r["guidance_sweep"]["best"]["cfg"] in (1.0, 2.0, 4.5, 6.0)
    assert [(s["sampler"], s["steps"]) for s in r["samplers"]] == [
        ("euler", 10),
        ("heun", 10),
        ("euler", 50),
        ("heun", 50),
    ]
    assert all(0.0 <= s["accuracy"] <= 1.0 and s["fd_dinov2"] > 0 for s in r["samplers"])
    assert 0.0 <= r["autoguidance"]["accuracy"] <= 1.0 and "AutoGuidance" in md

    # A re-run reuses every stage and rewrites the same report.
    again = runner.invoke(app, ["demo", "--out", str(out), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert again.output.count("done in an earlier run") == 10
    assert json.loads((out / "report.json").read_text()) == r

    print(f"full demo: {r['total_seconds']:.0f}s, {g['accuracy']:.1%}")
