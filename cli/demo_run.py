"""`flatdino demo`: every stage on the built-in digits, offline on a CPU, ending in a report.

The demo is a driver over the stage functions (the same ones the commands call), each with one
config. Its state lives in OUT/demo-state.json: finished stages are skipped on a re-run, an
interrupted stage is re-entered and resumes from its own checkpoints (stores skip finished shards,
trainers continue from RUN/checkpoints), so Ctrl-C and re-run continues where it stopped.

The class accuracy of the generated digits is judged by a classifier that never sees anything the
pipeline produced (`eval.judge`). The stages are in `demo_stages`, the report in `demo_report`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..pipeline.errors import InputError
from ..pipeline.store import write_atomic
from .demo_report import build_report, render_report
from .demo_stages import Demo, DemoConfig, Stage

STATE = "demo-state.json"


def _prepare(cfg: DemoConfig) -> dict:
    """Open or start OUT/demo-state.json; --fresh deletes OUT, but only a demo's own folder."""
    out = Path(cfg.out)
    state_path = out / STATE
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {cfg.out!r} is a file; pass a folder for the demo")
    if out.exists() and not state_path.exists() and any(out.iterdir()):
        raise InputError(
            f"{cfg.out!r} exists and is not a demo folder (no {STATE}); delete it or pass an "
            "empty or new --out"
        )
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not state_path.exists():
        state = {"recipe": cfg.recipe(), "stages": {}}
        _save_state(out, state)  # before any stage writes: a kill leaves a folder --fresh accepts
        return state
    try:
        state = json.loads(state_path.read_text())
        recipe = state["recipe"]
        if not isinstance(state["stages"], dict):
            raise TypeError("'stages' is not a mapping")
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(
            f"{str(state_path)!r} is unreadable ({e}); pass --fresh to start over"
        ) from e
    if recipe != cfg.recipe():
        changed = sorted(k for k, v in cfg.recipe().items() if recipe.get(k) != v)
        raise InputError(
            f"{cfg.out!r} was made with other demo settings ({', '.join(changed)}); pass --fresh "
            "to start over, or another --out"
        )
    return state


def _save_state(out: Path, state: dict) -> None:
    write_atomic(out / STATE, json.dumps(state, indent=2).encode())


def run_stages(cfg: DemoConfig, stages: list[Stage], echo: Callable[[str], None] = print) -> dict:
    """Run the stages not yet done in OUT/demo-state.json, recording each one's time and result."""
    out = Path(cfg.out)
    state = _prepare(cfg)
    for i, stage in enumerate(stages, 1):
        rec = state["stages"].setdefault(stage.name, {"done": False, "seconds": 0.0, "attempts": 0})
        if rec["done"]:
            echo(
                f"[{i}/{len(stages)}] {stage.name}: done in an earlier run ({rec['seconds']:.0f}s); skipped"
            )
            continue
        echo(f"[{i}/{len(stages)}] {stage.name}: {stage.what}")
        rec["attempts"] = rec.get("attempts", 0) + 1
        start = time.perf_counter()
        try:
            result = stage.run()
        finally:  # an interrupted stage keeps the time it spent; its re-run adds to it
            rec["seconds"] += time.perf_counter() - start
            _save_state(out, state)
        rec.update(result, done=True)
        _save_state(out, state)
        rate = f", {rec['items'] / rec['seconds']:.1f} {rec['unit']}/s" if rec.get("items") else ""
        echo(f"[{i}/{len(stages)}] {stage.name}: done in {rec['seconds']:.1f}s{rate}")
    return state


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = print) -> dict:
    """Run (or finish) every stage, then write OUT/report.json and OUT/report.md; returns the report."""
    state = run_stages(cfg, Demo(cfg).stages(), echo)
    report = build_report(cfg, state)
    out = Path(cfg.out)
    write_atomic(out / "report.json", json.dumps(report, indent=2).encode())
    write_atomic(out / "report.md", render_report(report).encode())
    return report
