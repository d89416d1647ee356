"""Resume under another number of ranks or another micro batch (issue 13, defect 5)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import fake_latents_store, tiny_dit_args, torchrun
from flatdino.pipeline.errors import FlatDinoError
from flatdino.pipeline.loader import LoaderConfig, plan_epoch
from flatdino.trainers.resume import map_position


def setup(world: int, micro: int, batch: int = 16, seed: int = 0) -> dict:
    return {"batch_size": batch, "micro_batch": micro, "world": world, "seed": seed}


def test_same_ranks_other_micro_batch_keeps_the_sample_position():
    pos, note = map_position(setup(2, 8), setup(2, 4), {"step": 3, "epoch": 1, "micro_step": 3})
    assert pos == {"step": 3, "epoch": 1, "micro_step": 6} and note is None  # 24 samples per rank


def test_other_ranks_continue_at_an_epoch_boundary_or_the_next_epoch():
    pos, note = map_position(setup(2, 8), setup(1, 16), {"step": 8, "epoch": 2, "micro_step": 0})
    assert pos == {"step": 8, "epoch": 2, "micro_step": 0} and "on 1 ranks" in note
    pos, note = map_position(setup(1, 16), setup(2, 8), {"step": 5, "epoch": 2, "micro_step": 1})
    assert pos == {"step": 5, "epoch": 3, "micro_step": 0} and "rest of epoch 2 is skipped" in note


def test_another_global_batch_or_seed_is_refused():
    with pytest.raises(FlatDinoError, match="batch_size 16 \\(now 32\\).*may change"):
        map_position(setup(2, 8), setup(2, 8, batch=32), {"step": 1, "epoch": 0, "micro_step": 1})
    with pytest.raises(FlatDinoError, match="seed 0 \\(now 1\\)"):
        map_position(setup(2, 8), setup(2, 8, seed=1), {"step": 1, "epoch": 0, "micro_step": 1})


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (3, 2)])
def test_no_row_is_seen_twice_in_an_epoch_across_a_change_of_ranks(before, after):
    """Epoch e on `before` ranks up to an interruption, then the mapped position on `after`."""
    valid = np.ones(200, bool)
    valid[::7] = False
    batch = 12  # global batch, divisible by every world here
    for stop in (0, 3):  # at the epoch boundary, and after 3 steps of the epoch
        seen = []
        for r in range(before):
            plan = plan_epoch(valid, 2, 8, LoaderConfig(batch // before, 0, 16, 0, r, before), 0)
            seen += [int(i) for b in plan.batches[:stop] for i in b]
        old = {"step": stop, "epoch": 0, "micro_step": stop}
        pos, _ = map_position(
            setup(before, batch // before, batch), setup(after, batch // after, batch), old
        )
        for r in range(after):
            plan = plan_epoch(
                valid, 2, 8, LoaderConfig(batch // after, 0, 16, 0, r, after), pos["epoch"]
            )
            rows = [int(i) for b in plan.batches[pos["micro_step"] :] for i in b]
            if pos["epoch"] == 0:
                seen += rows
        assert len(seen) == len(set(seen))  # never twice in epoch 0
        if stop == 0:
            assert sorted(seen) == np.flatnonzero(valid).tolist()  # the whole epoch, once


# 2 -> 1 ranks is slow (CI runs it with -m slow); 1 -> 2 covers the default suite
@pytest.mark.parametrize(
    "before, after, stop", [pytest.param(2, 1, 4, marks=pytest.mark.slow), (1, 2, 2)]
)
def test_a_gloo_run_resumes_on_another_number_of_ranks(tmp_path, before, after, stop):
    rng = np.random.default_rng(0)
    store = fake_latents_store(
        tmp_path / "lat.zarr",
        rng.standard_normal((64, 1, 8, 16)).astype(np.float32),
        np.arange(64) % 4,
    )
    run = tmp_path / "run"
    common = tiny_dit_args(store, run, 8)
    first = torchrun(before, *common, "--stop-after", str(stop))
    assert first.returncode == 0, first.stderr[-2000:]
    second = torchrun(after, *common, "--resume")
    assert second.returncode == 0, second.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))  # continued, one line per step
    log = (run / "log.txt").read_text()
    assert f"resumed from {run / 'checkpoints'} at step {stop}" in log
    assert f"on {after} ranks" in log


def test_ranks_that_find_different_checkpoints_are_refused(monkeypatch, tmp_path):
    import torch.distributed as dist

    from flatdino.trainers import resume
    from flatdino.trainers.runner import Dist

    def gather(out, mine):  # rank 1 sees no checkpoint (a disk only rank 0 has)
        out[0], out[1] = mine, (None, "/node2/run/checkpoints")

    monkeypatch.setattr(dist, "all_gather_object", gather)
    with pytest.raises(FlatDinoError, match="do not agree.*rank 0: step 40.*rank 1: no checkpoint"):
        resume._agree(40, tmp_path, Dist(0, 2))
    resume._agree(None, tmp_path, Dist(0, 1))  # one process: nothing to agree on
