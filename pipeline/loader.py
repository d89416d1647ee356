"""Batches for the trainers: chunk-shuffled features (train-vae) and in-memory latents (train-dit).

Features are read in whole chunks, never one row at a time.

Per epoch, from (seed, epoch) alone: a permutation of contiguous row blocks (aligned to the store's
chunks), dealt round-robin to the ranks; each rank streams the valid rows of its blocks through a
shuffle buffer (on indices, so a whole epoch's batches are known before any byte is read) and draws
one stored view per image. Every valid image is seen exactly once per epoch; ranks are disjoint and
run the same number of steps (a rank with fewer rows gets a shorter, possibly empty, last batch).

Blocks are read by torch DataLoader workers (`pipeline.loader_workers`) that open the store lazily
(spawn-safe: the dataset holds a path, shared memory and queues), in block order; the main process
assembles batches.
On local disk no byte goes into memory the loader has not used before (`pipeline.loader_memory`):
the workers read most rows straight into their batch's buffer in shared memory, which the batch is
a view of, and the others into row slots, where they wait for a batch whose buffer is still in use
and the main process copies them into it. The workers live as long as that memory: started once,
not per epoch.

Batches hold features as stored (`pipeline.quantise`): float16, or for an int8 store the pair
(codes, scales), which the trainer copies to its device and dequantises there
(`quantise.to_device`), so an int8 store halves the bytes read, pinned and copied.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from queue import Full, Queue

import numpy as np
import torch
from torch.utils.data import DataLoader

from .feature_store import FeatureStore
from .latent_store import LatentStore
from .loader_memory import BatchRing, RowSlots, SlotPlan, check_shared, shared_bytes
from .loader_workers import BlockReader, block_of
from .quantise import Stored, stored


@dataclass(frozen=True)
class LoaderConfig:
    """How batches are drawn from a store."""

    batch_size: int  # rows per batch on this rank
    seed: int = 0  # epoch order = f(seed, epoch)
    shuffle_buffer: int = 1024  # rows held for shuffling beyond the block order
    num_workers: int = 2  # DataLoader processes reading blocks (0: in the main process)
    rank: int = 0
    world: int = 1


@dataclass
class EpochPlan:
    """One rank's epoch, as indices: the blocks to read and the rows of each batch."""

    batches: list[np.ndarray]  # row indices per step (same count on every rank)
    views: np.ndarray  # (N,) the view drawn for each row this epoch
    blocks: np.ndarray  # this rank's block order


def plan_epoch(
    valid: np.ndarray, num_views: int, block_rows: int, cfg: LoaderConfig, epoch: int
) -> EpochPlan:
    """The deterministic plan of `epoch` for `cfg.rank` (pure numpy, no I/O)."""
    n = len(valid)
    num_blocks = -(-n // block_rows)
    order = np.random.default_rng([cfg.seed, epoch, 0]).permutation(num_blocks)
    views = np.random.default_rng([cfg.seed, epoch, 1]).integers(0, num_views, n)
    per_block = np.add.reduceat(valid.astype(np.int64), np.arange(0, n, block_rows)) if n else valid
    rank_rows = [int(per_block[order[r :: cfg.world]].sum()) for r in range(cfg.world)]
    steps = max(-(-rows // cfg.batch_size) for rows in rank_rows)
    blocks = order[cfg.rank :: cfg.world]
    stream = [
        np.flatnonzero(valid[b * block_rows : (b + 1) * block_rows]) + b * block_rows
        for b in blocks
    ]
    rows = _shuffle_buffer(
        np.concatenate(stream) if stream else np.zeros(0, np.int64),
        cfg.shuffle_buffer,
        np.random.default_rng([cfg.seed, epoch, 2, cfg.rank]),
    )
    batches = [rows[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(steps)]
    return EpochPlan(batches, views, blocks)


def _shuffle_buffer(stream: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A streaming shuffle buffer applied to indices: output[i] is drawn from a window of `size`."""
    if size <= 1 or len(stream) <= 1:
        return stream.copy()
    out = np.empty_like(stream)
    buf = list(stream[:size])
    k = 0
    for row in stream[size:]:
        j = int(rng.integers(len(buf)))
        out[k], buf[j] = buf[j], row
        k += 1
    out[k:] = np.asarray(buf, dtype=stream.dtype)[rng.permutation(len(buf))]
    return out


def _fill(batch: list[np.ndarray], slots: list[np.ndarray], waited: np.ndarray) -> None:
    """Row j of `batch` (per part) from row slot waited[j], for the rows that waited in a slot
    (>= 0): no name here outlives the call holding a view of the batch (`BatchRing`)."""
    for j in np.flatnonzero(waited >= 0).tolist():
        for part, array in zip(batch, slots, strict=True):
            part[j] = array[waited[j]]


# The batch buffers (`BatchRing`), and the batches a consumer holds while the next is assembled:
# through `prefetch`, the one the training loop is on and the one in the queue (also the producer
# thread's last), and, until the loop's thread has rebound its loop variable, the one before
# (`BatchRing.claim` waits a few ms for that). A row is read straight into its batch's buffer when
# its batch is at most RING - HELD - 1 ahead of the one being assembled, else into a row slot and
# copied again. Measured at batch 512 of 64-row blocks: 77-81% of the rows straight in, 968 slots;
# a training loop through `prefetch` kept 0 buffers from reuse in 2 epochs of 16 batches (HELD = 2:
# 4; a replaced buffer is new shared memory).
HELD = 3
RING = HELD + 5


class FeatureBatches:
    """Batches of stored features (B, P, C) (float16, or int8 codes with (B, P) scales) and
    int64 labels from a feature store."""

    def __init__(self, store: FeatureStore, cfg: LoaderConfig):
        self.path, self.cfg = store.path, cfg
        self.valid = store.valid_mask()
        self.labels = store.labels()
        self.num_views = store.num_views
        self.block_rows = store.block_rows  # one storage object: the unit of locality
        self.row_parts = (
            store.row_parts
        )  # (shape, dtype) of a row-view's features, or codes, scales
        self.num_valid = int(self.valid.sum())
        self._idle: list[_Memory] = []  # reused by the next epoch (module docstring)

    def steps_per_epoch(self) -> int:
        return len(plan_epoch(self.valid, self.num_views, self.block_rows, self.cfg, 0).batches)

    def views(self, epoch: int) -> np.ndarray:
        """(N,) the stored view each row is drawn with in `epoch` (what `epoch()` yields)."""
        return plan_epoch(self.valid, self.num_views, self.block_rows, self.cfg, epoch).views

    def epoch(
        self, epoch: int, start_step: int = 0
    ) -> Iterator[tuple[Stored, torch.Tensor, np.ndarray]]:
        """Yield (stored features (B, P, C), labels (B,), rows (B,)) for steps start_step.. of
        `epoch`; features are float16, or (codes int8 (B, P, C), scales (B, P)) for int8. A batch
        is a view of shared memory that is written again once nothing refers to it (`BatchRing`)."""
        plan = plan_epoch(self.valid, self.num_views, self.block_rows, self.cfg, epoch)
        batches = plan.batches[start_step:]
        needed = np.zeros(len(self.valid), dtype=bool)
        for rows in batches:
            needed[rows] = True
        k = self.block_rows
        rows_of = [block_of(needed, int(b), k)[2] for b in plan.blocks]
        blocks = np.array(
            [b for b, r in zip(plan.blocks, rows_of, strict=True) if len(r)], np.int64
        )
        read = [r for r in rows_of if len(r)]  # each block's rows, in read order
        # DataLoader asks each worker for `prefetch` blocks ahead (`_memory`): a batch's worth
        # between them, so that they read the next batch while this process hands one out, and 2
        # more each. A block may be written once the batches that need blocks `ahead` before it
        # are assembled.
        ahead = self._prefetch() * max(self.cfg.num_workers, 1) + 1
        places = SlotPlan.of(batches, read, len(self.valid), ahead, RING, HELD)
        memory = self._memory(places.capacity)
        memory.ring.begin()
        memory.epochs += 1
        tag, turns = memory.epochs, memory.turns
        for queue in turns:  # the n-th iteration of each worker reads epoch n
            queue.put(
                ("epoch", tag, blocks, plan.views, places.slot, places.batch, places.index,
                 memory.ring.first)
            )  # fmt: skip
        stream = iter(memory.loader)  # persistent workers: restarted on this epoch, not new
        turn = received = 0  # blocks handed their turn; blocks read

        def hand_turns(taken: int) -> None:
            """Each block whose places the first `taken` batches freed may be written now."""
            nonlocal turn
            while turn < len(blocks) and places.after[turn] <= taken:
                for t in places.claims[turn].tolist():
                    memory.ring.claim(t, turns)
                turns[turn % len(turns)].put(("turn", tag, turn))
                turn += 1

        hand_turns(0)
        slots = memory.slots.arrays()
        finished = False  # the epoch ran out or its consumer closed it: its memory is reusable
        try:
            for step, rows in enumerate(batches):
                while received <= places.last_block[step]:
                    got = next(stream)
                    assert got == received, (got, received)  # DataLoader keeps the order
                    received += 1
                if len(rows):
                    memory.ring.claim(step, turns)
                    got = memory.ring.view(step, len(rows))
                    _fill(got, slots, places.slot[rows])
                    x = stored([torch.from_numpy(part) for part in got])  # (B, P, C) [, (B, P)]
                else:
                    x = self._empty()  # empty tail batch
                hand_turns(step + 1)  # before the yield, which waits for the consumer
                yield x, torch.from_numpy(self.labels[rows]), rows
            finished = True
        except GeneratorExit:  # the training loop left the epoch
            finished = True
            raise
        finally:
            for queue in turns:  # a reader waiting for its turn stops (the epoch was left early)
                queue.put(("stop", tag))
            if finished:
                self._idle.append(memory)
            else:  # after an error a worker may still be writing: drop the memory, stop them now
                # (the error's traceback holds the iterator, whose deletion would stop them)
                getattr(stream, "_shutdown_workers", lambda: None)()  # none with 0 workers
                memory.loader = None
            del stream

    def _prefetch(self) -> int:
        """Blocks DataLoader asks each worker for ahead: a batch's worth between them, plus 2."""
        return -(-self.cfg.batch_size // (self.block_rows * max(self.cfg.num_workers, 1))) + 2

    def _memory(self, capacity: int) -> _Memory:
        """The memory of an earlier epoch (warm) and its workers, or new memory and workers (the
        first epoch, more rows waiting than it had room for, or another epoch of this loader
        still open), with a block's rows to spare: an epoch's plan may need a few more slots than
        the last one's."""
        for memory in self._idle:
            if memory.slots.capacity >= capacity:
                self._idle.remove(memory)
                return memory
        self._idle.clear()  # too small for this epoch: not kept beside the new memory
        parts = self.row_parts
        rows, batch = capacity + self.block_rows, self.cfg.batch_size
        check_shared(shared_bytes(parts, rows + RING * batch))
        slots, ring = RowSlots(parts, rows), BatchRing(parts, batch, RING)
        workers = self.cfg.num_workers
        context = multiprocessing.get_context()  # the platform's default, as DataLoader's
        turns = [context.Queue() for _ in range(max(workers, 1))]
        reader = BlockReader(self.path, self.block_rows, slots, ring.memory, turns)
        loader = DataLoader(
            reader,
            batch_size=None,
            num_workers=workers,
            # Own generator: a DataLoader iterator draws a seed, which must not advance the
            # global RNG (the trainer's sampling noise), or resuming mid-epoch would not be exact.
            generator=torch.Generator().manual_seed(0),
            multiprocessing_context=context if workers else None,
            prefetch_factor=self._prefetch() if workers else None,
            persistent_workers=workers > 0,  # no new processes, no new page tables, per epoch
        )
        return _Memory(slots, ring, turns, loader)

    def _empty(self) -> Stored:
        return stored(
            [torch.from_numpy(np.zeros((0, *shape), dtype)) for shape, dtype in self.row_parts]
        )


@dataclass
class _Memory:
    """What one epoch of `FeatureBatches` reads into and its workers, kept for the next."""

    slots: RowSlots
    ring: BatchRing
    turns: list  # a queue per worker (`BlockReader`)
    loader: DataLoader | None  # its workers, kept from epoch to epoch
    epochs: int = 0  # epochs begun


def _pinned(batch):
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, tuple | list):
        return type(batch)(_pinned(b) for b in batch)
    return batch  # numpy row indices and the like stay as they are


def prefetch(batches: Iterable, pin: bool = False) -> Iterator:
    """`batches`, produced one batch ahead on a thread; tensors in page-locked memory when `pin`
    (CUDA), so the trainer's `.to(device, non_blocking=True)` overlaps the previous step.

    Order and contents are those of `batches`; an error in the producer is raised here; closing
    this iterator (the loop leaving an epoch early) stops the producer."""
    done, stop = object(), threading.Event()
    queue: Queue = Queue(maxsize=1)  # one batch ready beside the one in use

    def offer(item) -> bool:
        """Put `item` unless the consumer has gone; False once it has."""
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not offer(_pinned(batch) if pin else batch):
                    return
            offer(done)
        except BaseException as e:  # handed to the consumer, raised there
            offer(e)

    thread = threading.Thread(target=produce, daemon=True, name="flatdino-prefetch")
    thread.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class LatentBatches:
    """Batches of latents (B, T, d) float32 and int64 labels, from a latents store held in memory.

    Latents are small (ImageNet: ~10-21 GB for two views), so each rank reads its share once: one
    contiguous range of the valid rows (rank r of W takes the r-th of W equal ranges), with every
    stored view. Only the chunks that hold its range are read (a chunk at each end may be shared
    with a neighbour), so W ranks read the store about once between them, not W times. The share
    is fixed for the run; the up to W-1 rows that do not divide evenly are left out, so every rank
    runs the same number of steps. Per epoch, from (seed, epoch, rank) alone: a permutation of the
    rank's rows and one random view per row; the last partial batch is dropped.

    With `cls`, the rank's CLS tokens (n, V, C) float16 are held too (1,536 bytes per row-view for
    ViT-B) and each batch also carries those of its rows and drawn views; the draws are the same.
    """

    def __init__(
        self,
        store: LatentStore,
        cfg: LoaderConfig,
        progress: bool = False,
        views: int | None = None,
        cls: bool = False,
    ):
        """`views`: train on the first K stored views only (None: all of them). `cls`: also
        yield each row's DINOv2 CLS token (a store without it is `require_cls`'s error)."""
        self.cfg = cfg
        if cls:
            store.require_cls()
        self.num_views = store.train_views(views)
        valid = store.valid_rows()
        per_rank = len(valid) // cfg.world
        rows = valid[cfg.rank * per_rank : (cfg.rank + 1) * per_rank]  # contiguous, sorted
        self.labels = store.labels()[rows]
        # (n, V, T, d); bytes_read (of mu) for the read-amplification benchmark
        self.latents, self.bytes_read = store.read_rows(rows, self.num_views, progress)
        self.cls = store.read_rows(rows, self.num_views, progress, "cls")[0] if cls else None

    def steps_per_epoch(self) -> int:
        return len(self.latents) // self.cfg.batch_size

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Yield (latents (B, T, d) float32, labels (B,)) for steps start_step.. of `epoch`, and
        with `cls` a third item: the CLS tokens (B, C) float32 of the same rows and views."""
        rng = np.random.default_rng([self.cfg.seed, epoch, self.cfg.rank])
        order = rng.permutation(len(self.latents))
        views = rng.integers(0, self.num_views, len(self.latents))
        b = self.cfg.batch_size
        for i in range(start_step, self.steps_per_epoch()):
            idx = order[i * b : (i + 1) * b]
            x = torch.from_numpy(self.latents[idx, views[idx]]).float()  # (B, T, d)
            if self.cls is None:
                yield x, torch.from_numpy(self.labels[idx])
            else:
                c = torch.from_numpy(self.cls[idx, views[idx]]).float()  # (B, C)
                yield x, torch.from_numpy(self.labels[idx]), c
