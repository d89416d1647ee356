"""The chunk-shuffled loader: coverage, determinism, disjoint ranks, views, resume position."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from flatdino.pipeline.feature_store import FeatureStore
from flatdino.pipeline.loader import FeatureBatches, LoaderConfig, _shuffle_buffer, plan_epoch


@given(
    n=st.integers(0, 300),
    block=st.integers(1, 17),
    world=st.integers(1, 4),
    batch=st.integers(1, 40),
    buffer=st.integers(0, 64),
    epoch=st.integers(0, 3),
    invalid=st.integers(0, 2**31),
)
@settings(max_examples=60, deadline=None)
def test_every_valid_row_once_per_epoch_disjoint_ranks_equal_steps(
    n, block, world, batch, buffer, epoch, invalid
):
    valid = np.random.default_rng(invalid).random(n) > 0.2
    plans = [
        plan_epoch(
            valid,
            2,
            block,
            LoaderConfig(batch, seed=5, shuffle_buffer=buffer, rank=r, world=world),
            epoch,
        )
        for r in range(world)
    ]
    rows = np.concatenate(
        [np.concatenate(p.batches) if p.batches else np.zeros(0, int) for p in plans]
    )
    assert sorted(rows.tolist()) == np.flatnonzero(valid).tolist()  # each valid row exactly once
    assert len({len(p.batches) for p in plans}) == 1  # same number of steps on every rank
    for p in plans:
        assert all(len(b) <= batch for b in p.batches)
        assert set(p.views.tolist()) <= {0, 1}


def test_plan_is_deterministic_per_seed_and_changes_per_epoch():
    valid = np.ones(500, bool)
    cfg = LoaderConfig(32, seed=1, shuffle_buffer=64)
    a, b = plan_epoch(valid, 3, 8, cfg, 0), plan_epoch(valid, 3, 8, cfg, 0)
    assert all(np.array_equal(x, y) for x, y in zip(a.batches, b.batches, strict=True))
    assert np.array_equal(a.views, b.views)
    c = plan_epoch(valid, 3, 8, cfg, 1)
    assert not np.array_equal(np.concatenate(a.batches), np.concatenate(c.batches))
    assert not np.array_equal(a.views, c.views)
    d = plan_epoch(valid, 3, 8, LoaderConfig(32, seed=2, shuffle_buffer=64), 0)
    assert not np.array_equal(np.concatenate(a.batches), np.concatenate(d.batches))


def test_shuffle_buffer_is_a_permutation_within_its_window():
    stream = np.arange(1000)
    out = _shuffle_buffer(stream, 50, np.random.default_rng(0))
    assert sorted(out.tolist()) == stream.tolist()
    assert not np.array_equal(out, stream)
    # an element can only come out after it entered: position >= its index - buffer size
    assert all(pos >= row - 50 for pos, row in enumerate(out.tolist()))


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_hold_the_stored_view_of_each_row(digits_val_store, workers):
    cfg = LoaderConfig(
        batch_size=40, seed=3, shuffle_buffer=32, num_workers=workers, rank=1, world=2
    )
    loader = FeatureBatches(FeatureStore(digits_val_store), cfg)
    features = zarr.open_group(str(digits_val_store))["features"]
    labels = zarr.open_group(str(digits_val_store))["labels"][:]
    plan = plan_epoch(loader.valid, 2, loader.block_rows, cfg, 4)
    seen = []
    for step, (x, y, rows) in enumerate(loader.epoch(4)):
        np.testing.assert_array_equal(rows, plan.batches[step])
        np.testing.assert_array_equal(y.numpy(), labels[rows])
        expected = np.stack([features[r, plan.views[r]] for r in rows[:3]])
        np.testing.assert_array_equal(x[:3].numpy(), expected)
        seen.extend(rows.tolist())
    assert len(seen) == len(set(seen)) > 150  # about half of the 359 rows


def test_resume_mid_epoch_yields_the_remaining_batches(digits_val_store):
    loader = FeatureBatches(
        FeatureStore(digits_val_store), LoaderConfig(batch_size=50, num_workers=0)
    )
    full = [rows for _, _, rows in loader.epoch(2)]
    tail = [(x, rows) for x, _, rows in loader.epoch(2, start_step=3)]
    assert [r.tolist() for _, r in tail] == [r.tolist() for r in full[3:]]
    assert tail[0][0].dtype.is_floating_point and tail[0][0].shape[1:] == (256, 64)


def test_block_reader_pickles_without_the_store(digits_val_store):
    """Spawn-safe: the dataset sent to worker processes holds a path and indices, no open store."""
    import pickle

    from flatdino.pipeline.loader import _BlockReader

    n = 359
    reader = _BlockReader(
        str(digits_val_store), np.arange(45), 8, np.ones(n, bool), np.zeros(n, np.int64)
    )
    clone = pickle.loads(pickle.dumps(reader))
    rows, data = next(iter(clone))
    assert rows.tolist() == list(range(8)) and tuple(data.shape) == (8, 256, 64)
    assert len(pickle.dumps(reader)) < 20_000


def test_prefetch_keeps_order_raises_and_stops():
    import threading

    from flatdino.pipeline.loader import prefetch

    batches = [(torch.full((2,), float(i)), np.arange(i)) for i in range(5)]
    got = list(prefetch(iter(batches)))
    assert [int(x[0]) for x, _ in got] == list(range(5)) and got[3][1].tolist() == [0, 1, 2]

    def broken():
        yield torch.zeros(1)
        raise ValueError("decode failed")

    stream = prefetch(broken())
    assert next(stream).shape == (1,)
    with pytest.raises(ValueError, match="decode failed"):
        next(stream)

    produced = []

    def endless():
        while True:
            produced.append(1)
            yield torch.zeros(1)

    stream = prefetch(endless())
    next(stream)
    stream.close()  # the consumer leaves early: the producer stops, one batch ahead at most
    assert not any(t.name == "flatdino-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(produced) <= 3


def test_prefetch_pins_every_tensor_of_a_batch_and_leaves_the_rest(monkeypatch):
    """`prefetch(pin=True)` (train-vae on CUDA) pins the features, or an int8 batch's codes and
    scales, and the labels, and hands numpy row indices over as they are. Page-locked memory needs
    a CUDA driver, so `pin_memory` is replaced by a copy that records what it was given."""
    from flatdino.pipeline.loader import prefetch

    pinned: list[torch.Tensor] = []

    def pin(t: torch.Tensor) -> torch.Tensor:
        pinned.append(t)
        return t.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    codes, scales = torch.ones(2, 3, 4, dtype=torch.int8), torch.ones(2, 3, dtype=torch.float16)
    labels, rows = torch.tensor([4, 7]), np.array([10, 11])
    batches = [((codes, scales), labels, rows), (torch.zeros(2, 3, 4), labels, rows)]
    got = list(prefetch(iter(batches), pin=True))
    sent = [codes, scales, labels, batches[1][0], labels]
    assert len(pinned) == 5 and all(t is s for t, s in zip(pinned, sent, strict=True))
    (x, y, r), (x2, _, r2) = got
    assert isinstance(x, tuple) and torch.equal(x[0], codes) and x[0] is not codes
    assert torch.equal(y, labels) and y is not labels and torch.equal(x2, torch.zeros(2, 3, 4))
    assert r is rows and r2 is rows


def test_pending_rows_grow_past_their_bound_and_come_back_in_the_asked_order():
    """The slots that hold rows between their block and their batch: a block larger than the free
    slots grows them (the plan's bound, buffer + batch + block, is not relied on), a batch comes
    back in its own row order whatever the slots, and a taken row's slot is used again."""
    from flatdino.pipeline.loader import _Pending

    pending = _Pending([((2,), np.int8), ((), np.float16)], capacity=1)
    codes = np.arange(8, dtype=np.int8).reshape(4, 2)
    pending.add(np.array([10, 11, 12, 13]), [codes, np.array([0.5, 1, 2, 4], np.float16)])
    assert pending.has(np.array([13, 10])) and not pending.has(np.array([10, 14]))
    got_codes, got_scales = pending.take(np.array([12, 10]))
    assert got_codes.tolist() == [[4, 5], [0, 1]] and got_scales.tolist() == [2.0, 0.5]
    slots = len(pending.parts[0])
    pending.add(np.array([20, 21]), [codes[:2] + 50, np.zeros(2, np.float16)])
    assert len(pending.parts[0]) == slots  # the two freed slots were used again
    assert pending.take(np.array([21, 11, 20]))[0].tolist() == [[52, 53], [2, 3], [50, 51]]
