"""bench/gpu_check.py, the one script a GPU machine runs, in its reduced CPU form so it never rots."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_the_gpu_check_runs_every_stage_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    rows = module.main(["--device", "cpu", "--reduced", "--out", str(tmp_path / "rows.json")])
    assert [r.stage.split(" (")[0].split(" ")[0] for r in rows[:7]] == [
        "extract-features",
        "train-vae",
        "encode-latents",
        "train-dit",
        "train-decoder",
        "sample",
        "eval",
    ]
    assert len(rows) == 13 and all(r.ok for r in rows), [r.error for r in rows if not r.ok]
    assert all(r.samples_per_s and r.samples_per_s > 0 for r in rows)
    table = capsys.readouterr().out
    assert "13 of 13 stages ok" in table and "train DiT tiny" in table
    assert "train DiT-DH dit-dh-tiny" in table and "train DiT tiny + CLS token" in table
    assert (tmp_path / "rows.json").exists()
