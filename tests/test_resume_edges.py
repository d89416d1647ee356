"""trainers/resume.py's refusals and no-ops: a --resume-from that does not exist, a run with no
checkpoint yet (starts fresh, nothing loaded), keep_finished when there is nothing to keep, and
the guard against a position that falls inside a micro batch."""

from __future__ import annotations

import pytest
import torch

from flatdino.pipeline.errors import FlatDinoError
from flatdino.trainers.resume import keep_finished, map_position, resume_run
from flatdino.trainers.runner import Dist


def test_a_position_inside_a_micro_batch_is_refused():
    setup = {"batch_size": 32, "seed": 0, "world": 1, "micro_batch": 8}
    saved = {**setup, "micro_batch": 4}
    assert map_position(saved, setup, {"epoch": 0, "micro_step": 4}) == (
        {"epoch": 0, "micro_step": 2},
        None,
    )
    with pytest.raises(FlatDinoError, match="^the checkpoint's position does not fall on a whole"):
        map_position(saved, setup, {"epoch": 0, "micro_step": 3})  # 12 samples: 1.5 of 8


def resume(resume_from, out):
    model = torch.nn.Linear(2, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {"step": 0}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    resume_run(resume_from, out, model, {}, opt, state, Dist(), {})
    return before, model.state_dict(), state


def test_a_missing_resume_from_is_one_line(tmp_path):
    with pytest.raises(FlatDinoError, match=r"^--resume-from '.*nope' does not exist$"):
        resume(str(tmp_path / "nope"), tmp_path)


def test_a_run_without_a_checkpoint_starts_fresh(tmp_path):
    before, after, state = resume(None, tmp_path)
    assert state == {"step": 0}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_keep_finished_keeps_nothing_from_the_same_folder_or_on_other_ranks(tmp_path):
    own = tmp_path / "checkpoints"
    own.mkdir()
    (own / "trainer.pt").write_bytes(b"not read")  # an early return never loads it
    keep_finished(tmp_path, own, Dist())  # continuing from its own checkpoint
    keep_finished(tmp_path, tmp_path / "pre-decay", Dist(rank=1, world=2))  # not rank 0
    assert not (tmp_path / "steps").exists()
