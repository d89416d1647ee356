"""Batches for the trainers: chunk-shuffled features (train-vae) and in-memory latents (train-dit).

Features are read in whole chunks, never one row at a time.

Per epoch, from (seed, epoch) alone: a permutation of contiguous row blocks (aligned to the store's
chunks), dealt round-robin to the ranks; each rank streams the valid rows of its blocks through a
shuffle buffer (on indices, so a whole epoch's batches are known before any byte is read) and draws
one stored view per image. Every valid image is seen exactly once per epoch; ranks are disjoint and
run the same number of steps (a rank with fewer rows gets a shorter, possibly empty, last batch).

Blocks are read by torch DataLoader workers that open the store lazily (spawn-safe: the dataset
holds a path, index arrays and shared buffers), in block order; the main process assembles batches.
No byte goes into memory the loader has not used before (`pipeline.loader_memory`): the workers
read most rows straight into their batch's buffer in shared memory, which the batch is a view of,
and the others into row slots, where they wait for a batch whose buffer is still in use and the
main process copies them into it.

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
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .feature_store import FeatureStore
from .latent_store import LatentStore
from .loader_memory import BatchRing, RowSlots, SlotPlan, check_shared, shared_bytes, wait_turn
from .quantise import Stored


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


class _BlockReader(IterableDataset):
    """Reads blocks in order, each row's drawn view into its batch's buffer or its row slot
    (`SlotPlan`), and yields the block's position once it is in; worker w reads positions w,
    w + W, ..., each once the main process has handed it the turn through its queue (the places
    are free), which also carries any batch buffer replaced since (a caller kept a batch). An int
    is all that crosses to the main process: DataLoader sends an array as a tensor in new shared
    memory, one file descriptor handed over per block (8 ms of the main process's time)."""

    def __init__(
        self,
        path: str,
        blocks: np.ndarray,
        block_rows: int,
        views: np.ndarray,
        plan: SlotPlan,
        slots: RowSlots,
        ring: list[RowSlots],
        turns: list,
    ):
        self.path, self.blocks, self.block_rows = path, blocks, block_rows
        self.views, self.plan = views, plan  # views: (N,) the view drawn for each row
        self.slots, self.ring, self.turns = slots, ring, turns

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        store = FeatureStore(self.path)  # opened in the worker (path or URL)
        plan, ring = self.plan, list(self.ring)
        for memory in (self.slots, *ring):
            memory.prefault()
        slots, buffers = self.slots.arrays(), [b.arrays() for b in ring]
        needed = plan.batch >= 0
        for p in range(worker, len(self.blocks), workers):
            lo, hi, rows = _block(needed, int(self.blocks[p]), self.block_rows)
            while isinstance(got := wait_turn(self.turns[worker]), tuple):
                i, ring[i] = got  # a batch buffer replaced: a caller kept the batch in it
                ring[i].prefault()
                buffers[i] = ring[i].arrays()
            if got is None:  # the epoch was left early, or the main process is gone
                return
            into: list[list[np.ndarray]] = [[] for _ in slots]  # per part, each row's place
            for s, t, j in zip(
                plan.slot[rows].tolist(),
                plan.batch[rows].tolist(),
                plan.index[rows].tolist(),
                strict=True,
            ):
                for k, part in enumerate(into):
                    part.append(slots[k][s] if s >= 0 else buffers[t % len(ring)][k][j])
            store.read_drawn(lo, hi, rows, self.views[rows], into=into)
            yield p


def _block(needed: np.ndarray, block: int, block_rows: int) -> tuple[int, int, np.ndarray]:
    """The bounds [lo, hi) of `block` and its rows still `needed` ((N,) bool)."""
    lo, hi = block * block_rows, min((block + 1) * block_rows, len(needed))
    return lo, hi, np.flatnonzero(needed[lo:hi]) + lo


# The batch buffers (`BatchRing`), and the batches a consumer holds while the next is assembled:
# through `prefetch`, the one in its queue, the producer thread's last one and the training loop's.
# A row is read straight into its batch's buffer when its batch is at most RING - HELD - 1 ahead of
# the one being assembled, else into a row slot and copied again. Measured at batch 512 of 64-row
# blocks: 77-81% of the rows straight in, 968 slots; a training loop through `prefetch` kept 0
# buffers from reuse in 2 epochs of 16 batches (HELD = 2: 4, and a replaced buffer is new memory).
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
        self.sample_shape = store.sample_shape  # (P, C)
        self.int8 = store.feature_dtype == "int8"
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
        rows_of = [_block(needed, int(b), k)[2] for b in plan.blocks]
        blocks = np.array(
            [b for b, r in zip(plan.blocks, rows_of, strict=True) if len(r)], np.int64
        )
        read = [r for r in rows_of if len(r)]  # each block's rows, in read order
        workers = min(self.cfg.num_workers, len(blocks))
        # DataLoader asks each worker for `prefetch` blocks ahead: a batch's worth between them, so
        # that they read the next batch while this process hands one out, and 2 more each. A
        # block may be written once the batches that need blocks `ahead` before it are assembled.
        prefetch = -(-self.cfg.batch_size // (k * max(workers, 1))) + 2
        ahead = prefetch * max(workers, 1) + 1
        places = SlotPlan.of(batches, read, len(self.valid), ahead, RING, HELD)
        memory = self._memory(places.capacity)
        memory.ring.begin()
        context = multiprocessing.get_context()  # the platform's default, as DataLoader's
        turns = [context.Queue() for _ in range(max(workers, 1))]  # new per epoch
        reader = _BlockReader(
            self.path, blocks, k, plan.views, places, memory.slots, memory.ring.buffers(), turns
        )
        # Own generator: a DataLoader iterator draws a seed, which must not advance the global RNG
        # (the trainer's sampling noise), or resuming mid-epoch would not be exact.
        generator = torch.Generator().manual_seed(0)
        stream = iter(
            DataLoader(
                reader,
                batch_size=None,
                num_workers=workers,
                generator=generator,
                multiprocessing_context=context if workers else None,
                prefetch_factor=prefetch if workers else None,
            )
        )
        turn = received = 0  # blocks handed their turn; blocks read

        def hand_turns(taken: int) -> None:
            """Each block whose places the first `taken` batches freed may be written now."""
            nonlocal turn
            while turn < len(blocks) and places.after[turn] <= taken:
                for t in places.claims[turn].tolist():
                    memory.ring.claim(t, turns)
                turns[turn % len(turns)].put(turn)
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
                    waited = places.slot[rows]  # the rows read before their buffer was free
                    for j in np.flatnonzero(waited >= 0).tolist():
                        for part, array in zip(got, slots, strict=True):
                            part[j] = array[waited[j]]
                    got = [torch.from_numpy(part) for part in got]
                    x = tuple(got) if self.int8 else got[0]  # (B, P, C) (int8: and scales (B, P))
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
                queue.put(None)
            del stream  # the DataLoader stops its workers (joins them) once nothing refers to it
            if finished:  # after an error a worker may outlive this frame: drop its memory
                self._idle.append(memory)

    def _memory(self, capacity: int) -> _Memory:
        """The memory of an earlier epoch (warm), or new memory (the first epoch, more rows
        waiting than it had room for, or another epoch of this loader still open), with a
        block's rows to spare: an epoch's plan may need a few more slots than the last one's."""
        for memory in self._idle:
            if memory.slots.capacity >= capacity:
                self._idle.remove(memory)
                return memory
        self._idle.clear()  # too small for this epoch: not kept beside the new memory
        p, c = self.sample_shape
        parts = [((p, c), np.int8), ((p,), np.float16)] if self.int8 else [((p, c), np.float16)]
        rows, batch = capacity + self.block_rows, self.cfg.batch_size
        check_shared(shared_bytes(parts, rows + RING * batch))
        return _Memory(RowSlots(parts, rows), BatchRing(parts, batch, RING))

    def _empty(self) -> Stored:
        p, c = self.sample_shape
        if self.int8:
            return torch.zeros(0, p, c, dtype=torch.int8), torch.zeros(0, p, dtype=torch.float16)
        return torch.zeros(0, p, c, dtype=torch.float16)


@dataclass
class _Memory:
    """What one epoch of `FeatureBatches` copies through, kept for the next."""

    slots: RowSlots
    ring: BatchRing


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
