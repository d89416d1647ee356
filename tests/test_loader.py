"""The chunk-shuffled loader: coverage, determinism, disjoint ranks, views, resume position."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from flatdino.pipeline.feature_store import FeatureStore
from flatdino.pipeline.loader import (
    FeatureBatches,
    LoaderConfig,
    _shuffle_buffer,
    plan_epoch,
    prefetch,
)


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
    features = zarr.open_group(str(digits_val_store))["features"][:]  # (N, V, P, C)
    labels = zarr.open_group(str(digits_val_store))["labels"][:]
    plan = plan_epoch(loader.valid, 2, loader.block_rows, cfg, 4)
    seen = []
    for step, (x, y, rows) in enumerate(loader.epoch(4)):
        np.testing.assert_array_equal(rows, plan.batches[step])
        np.testing.assert_array_equal(y.numpy(), labels[rows])
        np.testing.assert_array_equal(x.numpy(), features[rows, plan.views[rows]])
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
    features, views = zarr.open_group(str(digits_val_store))["features"][:], loader.views(2)
    for x, rows in tail:
        np.testing.assert_array_equal(x.numpy(), features[rows, views[rows]])


def test_block_reader_runs_in_a_spawned_worker_and_fills_the_planned_places(
    digits_val_store, monkeypatch
):
    """Spawn-safe (the default start method of Python 3.14 is not fork): the dataset sent to a
    worker holds a path, the shared memory and its queue, no open store. For each epoch its
    queue carries the plan, then each block's turn: the worker reads each row into the place the
    plan gives (a row slot, or its place in its batch's buffer, the ring turned by `first`; a
    buffer replaced on the queue is the new one), yields the block's position (an int), and stops
    at the epoch's end. The same worker reads the next epoch, skipping what the last one left."""
    import multiprocessing

    from torch.utils.data import DataLoader

    from flatdino.pipeline import loader_workers
    from flatdino.pipeline.feature_store import FeatureStore
    from flatdino.pipeline.loader_memory import RowSlots
    from flatdino.pipeline.loader_workers import BlockReader

    store = FeatureStore(digits_val_store)
    n, views = store.num_images, np.ones(store.num_images, np.int64)
    rng = np.random.default_rng(0)
    batch, index, slot = (np.full(n, -1) for _ in range(3))
    batch[:24] = np.arange(24) % 2  # rows 0..23: blocks 0, 1, 2 of 8 rows; batches 0 and 1
    for t in (0, 1):
        index[batch == t] = rng.permutation(12)
    slot[:24:3] = rng.permutation(8)  # every third row waits in a slot, the rest go straight in
    parts = [((256, 64), np.float16)]
    slots, ring = RowSlots(parts, 8), [RowSlots(parts, 12) for _ in range(2)]
    spawn = multiprocessing.get_context("spawn")
    turns = [spawn.Queue()]
    reader = BlockReader(str(digits_val_store), 8, slots, ring, turns)
    loader = DataLoader(
        reader, batch_size=None, num_workers=1, multiprocessing_context=spawn,
        persistent_workers=True,
    )  # fmt: skip
    blocks = np.array([2, 0, 1])
    for epoch, first in ((1, 1), (2, 0)):
        turns[0].put(("epoch", epoch, blocks, views, slot, batch, index, first))
        stream = iter(loader)
        for p, block in enumerate(blocks):
            if p == 1:  # a caller kept a batch: buffer 1 is new memory
                ring[1] = RowSlots(parts, 12)
                turns[0].put(("buffer", 1, ring[1]))
            turns[0].put(("turn", epoch, p))
            got = next(stream)
            assert type(got) is int and got == p  # an int crosses, not the rows
            rows = np.arange(8 * block, 8 * block + 8)
            expected = store.read_drawn(rows[0], rows[-1] + 1, rows, views[rows])
            buffers = [b.arrays()[0] for b in ring[first:] + ring[:first]]
            for r, row in zip(rows, expected, strict=True):
                place = slots.arrays()[0][slot[r]] if slot[r] >= 0 else buffers[batch[r]][index[r]]
                assert np.array_equal(place, row), (epoch, r)
            for array in (*slots.arrays(), *buffers):
                array[:] = 0  # the next epoch must write them again
        turns[0].put(("turn", epoch, 99))  # an earlier epoch's leftovers, skipped by the next
        turns[0].put(("stop", epoch))
        assert next(stream, "done") == "done"
    del stream, loader
    stopped = [spawn.Queue()]
    reader = BlockReader(str(digits_val_store), 8, slots, ring, stopped)  # in this process
    stopped[0].put(("stop", 1))  # epoch 1 ended before its plan came: nothing read
    assert list(reader) == []
    stopped[0].put(("epoch", 2, blocks, views, slot, batch, index, 0))
    stopped[0].put(("stop", 2))  # epoch 2 ended before a turn came: nothing read
    assert list(reader) == []
    monkeypatch.setattr(loader_workers, "wait_turn", lambda queue: None)  # the trainer is gone
    assert list(reader) == []


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


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 400),
    block=st.sampled_from([1, 7, 16, 64]),
    batch=st.integers(1, 64),
    buffer=st.sampled_from([0, 1, 24, 100]),
    ahead=st.integers(0, 5),
    start=st.integers(0, 3),
    lag=st.integers(1, 3),
    more=st.integers(0, 4),
)
def test_slot_plans_never_share_a_waiting_place_and_never_deadlock(
    n, block, batch, buffer, ahead, start, lag, more
):
    """For any epoch (a resumed one too): every row read has its place in its batch, and goes
    there straight only when the batch buffer's earlier batch was assembled `lag` batches before
    the block may be written, else waits in a slot; a slot given to a row of block p was freed by a
    batch assembled before p may be written (so no row is overwritten while it waits); a block
    never waits on a batch that needs it or the `ahead` blocks before it (no deadlock, no stall);
    and the slots are about buffer + batch + ahead + 1 blocks."""
    from flatdino.pipeline.loader_memory import SlotPlan

    valid = np.random.default_rng(n).random(n) < 0.9
    cfg = LoaderConfig(batch_size=batch, seed=n, shuffle_buffer=buffer)
    epoch = plan_epoch(valid, 2, block, cfg, 0)
    batches = epoch.batches[start:]
    needed = np.zeros(n, bool)
    for rows in batches:
        needed[rows] = True
    read = [np.flatnonzero(needed[b * block : (b + 1) * block]) + b * block for b in epoch.blocks]
    read = [rows for rows in read if len(rows)]
    ring = lag + more
    plan = SlotPlan.of(batches, read, n, ahead, ring, lag)
    assert np.flatnonzero(plan.batch >= 0).tolist() == np.flatnonzero(needed).tolist()
    for t, rows in enumerate(batches):
        assert plan.batch[rows].tolist() == [t] * len(rows)
        assert plan.index[rows].tolist() == list(range(len(rows)))
    assert plan.slot.max(initial=-1) < plan.capacity
    assert not (plan.slot[~needed] >= 0).any()
    freed_by: dict[int, int] = {}  # slot -> the batch its last row was copied out in
    position = {int(r): p for p, rows in enumerate(read) for r in rows}
    for p, rows in enumerate(read):
        taken, straight = plan.after[p], plan.slot[rows] < 0
        # the buffer's earlier batch, t - ring, was assembled at least lag batches before
        assert (plan.batch[rows[straight]] - ring <= taken - 1 - lag).all()
        assert (plan.batch[rows[~straight]] >= taken + ring - lag).all()  # else it would not wait
        assert plan.claims[p].tolist() == sorted(set(plan.batch[rows[straight]].tolist()))
        for r in rows[~straight].tolist():
            s = int(plan.slot[r])
            assert taken > freed_by.get(s, -1)  # its last row's batch is copied out
            freed_by[s] = int(plan.batch[r])
        assert taken == 0 or plan.last_block[taken - 1] < p - ahead
    needs = [max((position[int(r)] for r in rows), default=-1) for rows in batches]
    assert plan.last_block.tolist() == (np.maximum.accumulate(needs).tolist() if needs else [])
    assert plan.capacity <= buffer + 2 * batch + (ahead + 2) * block


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_kept_by_the_caller_are_never_written_again(digits_val_store, workers):
    """A batch buffer is written again only once nothing refers to its batch: every batch of two
    epochs, all kept, still holds its own rows (the buffers are replaced); the same epochs drawn
    as the training loop draws them (through `prefetch`, each batch dropped when the next comes)
    are equal, come from the ring's own buffers, none replaced, and the second epoch reuses the
    first one's memory."""
    import time

    from flatdino.pipeline.loader import RING

    store = FeatureStore(digits_val_store)
    cfg = LoaderConfig(batch_size=16, seed=1, shuffle_buffer=24, num_workers=workers)
    loader = FeatureBatches(store, cfg)
    kept = [(x, rows, e) for e in (0, 1) for x, _, rows in loader.epoch(e)]
    features = zarr.open_group(str(digits_val_store))["features"][:]  # (N, V, P, C)
    for x, rows, e in kept:
        assert np.array_equal(x.numpy(), features[rows, loader.views(e)[rows]])
    assert len(kept) > 2 * RING  # more batches than buffers: the later ones are new memory
    assert loader._idle[0].ring.replaced >= len(kept) - RING
    loader, memory, step = FeatureBatches(store, cfg), set(), 0
    for e in (0, 1):
        for x, _, rows in prefetch(loader.epoch(e)):
            assert torch.equal(x, kept[step][0]) and np.array_equal(rows, kept[step][1])
            memory.add(x.data_ptr())
            step += 1
            time.sleep(0.02)  # a training step: `prefetch` holds the batches ahead of it
    (idle,) = loader._idle  # one set of memory, both epochs
    assert idle.ring.replaced == 0
    assert idle.ring.first == len(kept) // 2 % RING  # epoch 1 began after epoch 0's last batch
    assert memory == {buffer.tensors[0].data_ptr() for buffer in idle.ring.memory}


def test_an_epoch_left_early_stops_its_workers_and_gives_its_memory_back(
    digits_val_store, monkeypatch
):
    """The training loop leaving an epoch (a crash, the run's last step): the workers waiting for
    their turn are told the epoch ended, so closing takes well under DataLoader's 5 s join; the
    next epochs reuse the memory and the same worker processes (no new fork, no new page
    tables), and are exact, with what the left epoch's turns left in the queues skipped."""
    import time

    store = FeatureStore(digits_val_store)
    cfg = LoaderConfig(batch_size=8, seed=2, shuffle_buffer=8, num_workers=2)
    loader = FeatureBatches(store, cfg)
    epoch = loader.epoch(0)
    next(epoch)  # the workers are blocked: each has filled its slots

    def workers() -> list[int]:  # DataLoader's persistent worker processes (a private field)
        (memory,) = loader._idle
        return [w.pid for w in memory.loader._iterator._workers]

    start = time.perf_counter()
    epoch.close()
    assert time.perf_counter() - start < 3 and len(loader._idle) == 1
    pids = workers()
    features = zarr.open_group(str(digits_val_store))["features"][:]  # (N, V, P, C)
    for e in (1, 2):
        got = []
        for x, _, rows in loader.epoch(e):
            np.testing.assert_array_equal(x.numpy(), features[rows, loader.views(e)[rows]])
            got.append(rows.tolist())
        assert got == [
            rows.tolist() for rows in plan_epoch(loader.valid, 2, loader.block_rows, cfg, e).batches
        ]
        assert len(loader._idle) == 1 and workers() == pids


def test_a_worker_whose_trainer_died_stops_waiting_for_a_slot(monkeypatch):
    """A worker waiting for a free slot returns None once its parent process is gone (its
    parent pid changes), rather than waiting for ever; a slot or None is handed through."""
    import queue as queues

    from flatdino.pipeline import loader_workers

    free = queues.Queue()
    free.put(3)
    free.put(None)
    assert (
        loader_workers.wait_turn(free, poll=0.01) == 3
        and loader_workers.wait_turn(free, poll=0.01) is None
    )
    parents = iter([100, 100, 1])  # alive at the start and after one poll, then re-parented
    monkeypatch.setattr(loader_workers.os, "getppid", lambda: next(parents))
    assert loader_workers.wait_turn(free, poll=0.01) is None


@pytest.mark.parametrize("workers", [0, 2])
def test_a_read_error_reaches_the_trainer_and_its_epoch_memory_is_not_reused(
    digits_val_store, monkeypatch, workers
):
    """A block that cannot be read raises in the training loop as it was raised; that epoch's
    memory is dropped, not reused (after an error a worker may still be writing into it), and
    its worker processes are stopped."""
    import multiprocessing

    store = FeatureStore(digits_val_store)
    loader = FeatureBatches(store, LoaderConfig(batch_size=8, num_workers=workers))
    before = set(multiprocessing.active_children())

    def fail(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(FeatureStore, "read_drawn", fail)  # forked workers inherit it
    with pytest.raises(OSError, match="disk gone"):
        next(loader.epoch(0))
    assert loader._idle == []
    assert set(multiprocessing.active_children()) <= before


def test_a_worker_maps_the_row_slots_at_once_not_a_page_fault_per_page(monkeypatch):
    """A forked worker (a new one every epoch) writing shared slots that its parent has mapped
    takes a fault per page; `prefault` maps them in one call: a fresh child then writes them
    with (almost) none. Linux >= 5.14 (this machine's kernel)."""
    import multiprocessing

    from flatdino.pipeline.loader_memory import RowSlots

    slots = RowSlots([((8192,), np.float16), ((512,), np.int8)], capacity=512)  # 2,112 pages
    for array in slots.arrays():
        array[:] = 0  # the parent's pages exist; a child has no page tables for them
    fork = multiprocessing.get_context("fork")
    faults = []
    for prefault_first in (False, True):
        queue = fork.Queue()
        child = fork.Process(target=_prefault_child, args=(slots, queue, prefault_first))
        child.start()
        faults.append(queue.get(timeout=30))
        child.join()
    assert faults[0] >= 2112 and faults[1] <= faults[0] / 10, faults  # the rest: Python's own
    from flatdino.pipeline import loader_memory

    monkeypatch.setattr(loader_memory.sys, "platform", "darwin")  # no madvise asked for there
    monkeypatch.setattr(loader_memory.ctypes, "CDLL", None)
    slots.prefault()


def _prefault_child(slots, queue, prefault_first: bool) -> None:
    import resource

    if prefault_first:
        slots.prefault()
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for array in slots.arrays():
        array[:] = 1
    queue.put(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)


def test_too_little_shared_memory_for_the_row_slots_is_one_line(digits_val_store, monkeypatch):
    """A container's /dev/shm too small for the row slots (Docker's default is 64 MB): one line
    with the sizes and the fixes, before any byte is written (past its end a page is a bus
    error in whichever process touches it)."""
    import shutil

    from flatdino.pipeline import loader_memory
    from flatdino.pipeline.errors import FlatDinoError

    usage = shutil.disk_usage("/")
    monkeypatch.setattr(loader_memory.shutil, "disk_usage", lambda path: usage._replace(free=10**6))
    loader = FeatureBatches(FeatureStore(digits_val_store), LoaderConfig(8, num_workers=0))
    with pytest.raises(FlatDinoError, match=r"needs 0\.\d\d GB of shared memory \(/dev/shm\)") as e:
        next(loader.epoch(0))
    assert "0.00 GB is free" in str(e.value) and "--shm-size" in str(e.value)
    assert "--micro-batch" in str(e.value)
    monkeypatch.undo()
    assert next(loader.epoch(0))[0].shape[0] == 8
