"""The memory the feature loader (`pipeline.loader`) copies its bytes through, allocated once per
loader and reused every epoch: block slots in shared memory that the workers decode into, row slots
where rows wait for their batch, and batch buffers handed out again once nothing refers to them.

Fresh memory is what made the loader slow: on the VM it was measured on, a first touch costs a page
fault per 4 KiB (a new 201 MB array fills at 2.4 GB/s, a warm one at 16 GB/s), or, for numpy's
transparent huge pages, a compaction stall now and then (docs/benchmarks.md). Forked workers make
warm memory fresh again: while a child forked from the trainer lives, each page the trainer writes
is first copied for it (copy-on-write), so the row slots and batch buffers are `private_array`s,
which a forked child does not map.
"""

from __future__ import annotations

import mmap
import os
import weakref
from queue import Empty

import numpy as np
import torch


def private_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An empty array that a forked child process does not inherit (Linux's MADV_DONTFORK), so
    the parent's writes to it never copy a page for a child (copy-on-write): with fork, the
    default start method of Python <= 3.13 on Linux, the DataLoader's workers live for a whole
    epoch, and writing the loader's memory through shared pages faulted once per 4 KiB (6x the
    CPU time of the copies, measured). Only the process that made it may touch it."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if not nbytes or not hasattr(mmap, "MADV_DONTFORK"):
        return np.empty(shape, dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # page-aligned
    memory.madvise(mmap.MADV_DONTFORK)
    return np.frombuffer(memory, dtype).reshape(shape)  # keeps `memory` alive


class BlockSlots:
    """Block-sized buffers in shared memory, `per_reader` for each reader: reader w decodes its
    blocks into its own slots, w * per_reader + 0.., and the main process hands each slot back
    (through reader w's queue) once it has copied the rows out. A reader waits for a free slot, so
    it runs at most `per_reader` blocks ahead; it never waits on a block the main process has yet
    to ask for, since that takes its blocks in order and hands each back before the next."""

    per_reader = 4  # DataLoader asks each worker for 2 blocks ahead of the one in use

    def __init__(self, parts: list[tuple[tuple[int, ...], type]], block_rows: int, readers: int):
        self.readers = readers
        dtypes = {np.dtype(np.float16): torch.float16, np.dtype(np.int8): torch.int8}
        self.buffers = [
            [
                torch.empty((block_rows, *shape), dtype=dtypes[np.dtype(dtype)]).share_memory_()
                for shape, dtype in parts
            ]
            for _ in range(readers * self.per_reader)
        ]

    def queues(self, context) -> list:
        """One queue of free slots per reader, all free, in the DataLoader's multiprocessing
        `context` (new per epoch: an epoch left early leaves no slot taken in the next)."""
        queues = [context.Queue() for _ in range(self.readers)]
        for w, queue in enumerate(queues):
            for slot in range(w * self.per_reader, (w + 1) * self.per_reader):
                queue.put(slot)
        return queues


def free_slot(queue, poll: float = 1.0) -> int | None:
    """The next free slot from `queue`: None when handed None, or when the process that started
    this one has died (a worker waiting here would otherwise outlive a killed trainer)."""
    parent = os.getppid()
    while True:
        try:
            return queue.get(timeout=poll)
        except Empty:
            if os.getppid() != parent:
                return None


class Pending:
    """Rows read but not yet batched, copied out of their block into slots of a few arrays that
    live as long as the loader. A block slot is handed back as soon as its rows are copied: the
    rows waiting in the shuffle buffer hold only themselves, not their whole block (which kept
    ~3.5x the waiting rows alive: 88 blocks, 2.2 GB of real rows, for 1,568 rows at batch 512). A
    batch is its rows copied out of the slots with `np.take` (torch 2.14's CPU stack of float16
    rows copies at 0.1-1 GB/s here, numpy at ~10 GB/s; `np.take`'s default mode="raise" copies
    through a temporary array, new memory again)."""

    def __init__(self, parts: list[tuple[tuple[int, ...], type]], capacity: int):
        self.parts = [private_array((capacity, *shape), dtype) for shape, dtype in parts]
        self.clear()

    def clear(self) -> None:
        """Every slot free (a new epoch)."""
        self.free = list(range(len(self.parts[0]) - 1, -1, -1))
        self.slot: dict[int, int] = {}  # row -> its slot

    def has(self, rows: np.ndarray) -> bool:
        return all(int(r) in self.slot for r in rows)

    def add(self, rows: np.ndarray, data: list[np.ndarray]) -> None:
        if len(rows) > len(self.free):  # more rows waiting than the plan's bound: grow
            n = len(self.parts[0])
            extra = max(n, len(rows))
            grown = [private_array((n + extra, *a.shape[1:]), a.dtype) for a in self.parts]
            for new, old in zip(grown, self.parts, strict=True):
                new[:n] = old
            self.parts = grown
            self.free[:0] = range(n + extra - 1, n - 1, -1)
        slots = [self.free.pop() for _ in range(len(rows))]
        for array, block in zip(self.parts, data, strict=True):
            array[slots] = block
        self.slot.update(zip(rows.tolist(), slots, strict=True))

    def take(self, rows: np.ndarray, into: Batches | None = None) -> list[np.ndarray]:
        """The parts of `rows`, in that order, in new arrays (from `into` when given); their
        slots are free again."""
        slots = np.array([self.slot.pop(int(r)) for r in rows], dtype=np.int64)
        out = into.get(len(rows)) if into else [np.empty_like(a[: len(rows)]) for a in self.parts]
        for array, part in zip(self.parts, out, strict=True):
            np.take(array, slots, axis=0, out=part, mode="clip")  # slots are valid indices
        self.free.extend(slots.tolist())
        return out


class Batches:
    """Batch buffers for `Pending.take`, each handed out as a new view and handed out again once
    no view of it is alive (the trainer has moved on: its batch, and any tensor sharing its
    memory, is gone). When all are in use (a caller keeping its batches) a batch is new memory."""

    def __init__(self, parts: list[tuple[tuple[int, ...], type]], rows: int, keep: int = 4):
        self.parts, self.rows, self.keep = parts, rows, keep
        self.buffers: list[tuple[list[np.ndarray], list[weakref.ref]]] = []

    def get(self, n: int) -> list[np.ndarray]:
        """One array of n <= `rows` rows per part."""
        idle = [i for i, (_, handed) in enumerate(self.buffers) if all(r() is None for r in handed)]
        if not idle:
            if len(self.buffers) >= self.keep:  # the caller's to keep: plain memory
                return [np.empty((n, *shape), dtype) for shape, dtype in self.parts]
            buffers = [private_array((self.rows, *shape), dtype) for shape, dtype in self.parts]
            self.buffers.append((buffers, []))
            idle = [len(self.buffers) - 1]
        buffers, handed = self.buffers[idle[0]]
        views = [b[:n] for b in buffers]
        handed[:] = [weakref.ref(v) for v in views]
        return views
