"""The memory the feature loader (`pipeline.loader`) reads its bytes into, allocated once per loader
and reused every epoch, all of it shared with the DataLoader's workers: a ring of batch buffers
that the workers read most rows straight into and each batch is handed out as a view of
(`BatchRing`), and row slots where the other rows wait for their batch (`RowSlots`); `SlotPlan`
says, before the epoch, where each row goes and when a worker may write it.

Copies are what bound the loader: on the VM it was measured on, one process copies ~18 GB/s and
two together ~36 GB/s, and a row read into a slot is copied a second time, by the trainer, into
its batch. A row read straight into its batch's buffer is copied once, by a worker. Fresh memory
is the other cost: a first touch costs a page fault per 4 KiB (a new 201 MB array fills at
2.4 GB/s, a warm one at 16 GB/s), and a worker forked for an epoch touches every page of shared
memory for the first time (`prefault`).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import sys
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from .errors import FlatDinoError

SHARED = "/dev/shm"  # where torch puts shared memory on Linux (a tmpfs: Docker's default is 64 MB)
MADV_POPULATE_WRITE = 23  # <linux/mman.h>, Linux >= 5.14
Parts = list[tuple[tuple[int, ...], type]]  # (row shape, dtype) of each stored part


def shared_bytes(parts: Parts, rows: int) -> int:
    """Bytes of `rows` rows of every part."""
    return sum(rows * int(np.prod(shape)) * np.dtype(t).itemsize for shape, t in parts)


def check_shared(nbytes: int) -> None:
    """A one-line error when shared memory has less than `nbytes` free: past its end a page is a
    bus error in whichever process touches it first."""
    free = shutil.disk_usage(SHARED).free if os.path.isdir(SHARED) else nbytes
    if nbytes > free:
        raise FlatDinoError(
            f"the feature loader needs {nbytes / 1e9:.2f} GB of shared memory ({SHARED}) for its "
            f"batch buffers and row slots and {free / 1e9:.2f} GB is free; give the container "
            "more (`docker run --shm-size 16g`), or pass a smaller --micro-batch"
        )


class RowSlots:
    """`capacity` rows in shared memory, one tensor per stored part: the row slots, or one batch
    buffer of a `BatchRing`."""

    def __init__(self, parts: Parts, capacity: int):
        self.capacity = capacity
        dtypes = {np.dtype(np.float16): torch.float16, np.dtype(np.int8): torch.int8}
        self.tensors = [
            torch.empty((capacity, *shape), dtype=dtypes[np.dtype(dtype)]).share_memory_()
            for shape, dtype in parts
        ]

    def prefault(self) -> None:
        """Map every page of these rows into this process at once (Linux's MADV_POPULATE_WRITE),
        for a worker started for an epoch: a process's first write to a page of shared memory is a
        page fault (fork copies no page tables of shared memory), 146,000 per worker per epoch,
        most of its reading time (measured: 6 ms per 25 MB block, 2.3 ms once mapped).
        Elsewhere, or on a kernel before 5.14 (EINVAL), a no-op: the pages fault in as written."""
        if not sys.platform.startswith("linux"):
            return
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for t in self.tensors:
            start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
            madvise(start, t.data_ptr() + t.nbytes - start, MADV_POPULATE_WRITE)

    def arrays(self) -> list[np.ndarray]:
        """The rows as numpy arrays (views: not attributes, or a spawned worker would be sent
        their bytes)."""
        return [t.numpy() for t in self.tensors]


class BatchRing:
    """`size` batch buffers in shared memory; batch t of an epoch is assembled in buffer
    (first + t) % size, `first` the one after the last handed out in the epoch before (a training
    loop still holds that epoch's last batch), and handed out as a view of it; the workers read
    its rows straight in (`SlotPlan`).

    A buffer is written again only once no view of it is alive (the trainer has moved on: its
    batch, and any tensor sharing its memory, is gone). When one still is (a caller keeping its
    batches), the buffer is replaced by new shared memory, and each worker is sent the new one
    (its queue carries it ahead of the next turn) before any row is written into it."""

    def __init__(self, parts: Parts, rows: int, size: int):
        self.parts, self.rows, self.size = parts, rows, size
        self.memory = [RowSlots(parts, rows) for _ in range(size)]
        self.handed: list[list[weakref.ref]] = [[] for _ in range(size)]
        self.holder: list[int | None] = [None] * size  # the batch each buffer is for this epoch
        self.first = 0  # the buffer of this epoch's batch 0
        self.last = -1  # the last batch handed out this epoch
        self.replaced = 0  # buffers replaced since the loader was made (a caller kept a batch)

    def begin(self) -> None:
        """A new epoch: batch numbers start again at 0, in the buffer after the last handed out."""
        self.first = (self.first + self.last + 1) % self.size
        self.holder, self.last = [None] * self.size, -1

    def claim(self, batch: int, queues: list) -> None:
        """Batch `batch`'s buffer, before a row of it is written; its earlier batch has been
        handed out (`SlotPlan`)."""
        i = (self.first + batch) % self.size
        if self.holder[i] == batch:
            return
        self.holder[i] = batch
        if not self._released(i):
            check_shared(shared_bytes(self.parts, self.rows))
            self.memory[i], self.handed[i] = RowSlots(self.parts, self.rows), []
            self.replaced += 1
            for queue in queues:
                queue.put(("buffer", i, self.memory[i]))

    def _released(self, i: int) -> bool:
        """Whether no view of buffer i is alive, after a few ms for the consumer's thread to let
        go of one: it holds the GIL to rebind its loop variable after taking the next batch."""
        deadline = time.monotonic() + 2 * sys.getswitchinterval()
        while any(ref() is not None for ref in self.handed[i]):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True

    def view(self, batch: int, n: int) -> list[np.ndarray]:
        """The first `n` rows of `batch`'s buffer, one array per part."""
        i = (self.first + batch) % self.size
        assert self.holder[i] == batch, (self.holder[i], batch)
        views = [array[:n] for array in self.memory[i].arrays()]
        self.handed[i], self.last = [weakref.ref(v) for v in views], batch
        return views


@dataclass
class SlotPlan:
    """Where each row of an epoch goes, fixed before any byte is read, and when: the batch it is
    in, `batch[row]`, and its place there, `index[row]`; a worker reads it straight into that
    batch's buffer (`BatchRing`) when the buffer's earlier batch has been handed out `lag`
    batches before, else into a row slot, `slot[row]`, that the trainer copies it out of; for
    block position p, `after[p]` is the number of batches the trainer must have assembled before
    a worker may write block p, and `claims[p]` the batches whose buffers it writes into.

    A block only takes slots that batches needing blocks before p - `ahead` gave back, so a worker
    never waits on a batch that needs its own block (no deadlock) nor, with `ahead` at least the
    blocks the DataLoader asks for in advance, on the batch being assembled."""

    batch: np.ndarray  # (N,) int64, -1 for a row not read this epoch
    index: np.ndarray  # (N,) int64, the row's place in its batch
    slot: np.ndarray  # (N,) int64, -1 for a row not read or read straight into its batch
    after: np.ndarray  # (blocks,) int64, non-decreasing
    claims: list[np.ndarray]  # (blocks,) the batches each block reads rows straight into
    last_block: np.ndarray  # (batches,) the last block position each batch waits for
    capacity: int  # row slots

    @classmethod
    def of(
        cls,
        batches: list[np.ndarray],
        blocks: list[np.ndarray],
        n: int,
        ahead: int,
        ring: int,
        lag: int = 1,
    ) -> SlotPlan:
        """The plan of `batches` (row indices) over `blocks` (the rows read from each block, in
        read order) for a store of `n` rows, with a ring of `ring` batch buffers and a consumer
        that holds its last `lag` >= 1 batches."""
        assert lag >= 1
        position, batch, index = (np.full(n, -1, np.int64) for _ in range(3))
        for p, rows in enumerate(blocks):
            position[rows] = p
        for t, rows in enumerate(batches):
            batch[rows], index[rows] = t, np.arange(len(rows))
        needs = [int(position[rows].max()) if len(rows) else -1 for rows in batches]
        last_block = np.maximum.accumulate(needs) if needs else np.zeros(0, np.int64)
        slot, after = np.full(n, -1, np.int64), np.zeros(len(blocks), np.int64)
        claims: list[np.ndarray] = []
        free: list[int] = []
        capacity = taken = 0
        for p, rows in enumerate(blocks):
            while taken < len(batches) and last_block[taken] < p - ahead:
                gone = slot[batches[taken]]
                free.extend(gone[gone >= 0].tolist())  # copied out before p is written
                taken += 1
            after[p] = taken
            # batch t's buffer was batch t - ring's, handed out `lag` batches before `taken`
            straight = batch[rows] < taken + ring - lag
            claims.append(np.unique(batch[rows[straight]]))
            waits = rows[~straight]
            reused = min(len(free), len(waits))
            new = len(waits) - reused
            slot[waits] = free[len(free) - reused :] + list(range(capacity, capacity + new))
            del free[len(free) - reused :]
            capacity += new
        return cls(batch, index, slot, after, claims, last_block, capacity)
