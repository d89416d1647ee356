"""Lines of eval/, trainers/, models/ and sampling/ that no other test ran (the coverage ledger,
docs/coverage.md): refusals of bad input, each one line naming the option that fixes it, and the
rare outcomes (a store that does not answer a roll call, saved statistics without a record, a
process group made by the caller). In-process, tiny and fast: fake stores, no training."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from flatdino.pipeline.errors import FlatDinoError

# eval/sweep.py


@pytest.mark.parametrize("text", ['{"key": "trunc', "[1, 2]"])  # cut short; not an object
def test_an_unreadable_sweep_record_is_refused_and_overwrite_replaces_it(tmp_path, text):
    from flatdino.eval.sweep import FILES, SweepConfig, _open_out

    (tmp_path / "sweep.json").write_text(text)
    (tmp_path / "sweep.csv").write_text("cfg,interval_start,fd_dinov2\n")
    run = SimpleNamespace(key="k", identity={"seed": 0})
    cfg = SweepConfig(dit="d", features="f", out=str(tmp_path))
    message = r"sweep\.json' is unreadable \(.*\); pass --overwrite$"
    with pytest.raises(FlatDinoError, match=message):
        _open_out(cfg, tmp_path, run)
    overwrite = SweepConfig(dit="d", features="f", out=str(tmp_path), overwrite=True)
    assert _open_out(overwrite, tmp_path, run) == {}  # what the refusal advised works
    assert not any((tmp_path / name).exists() for name in FILES)
