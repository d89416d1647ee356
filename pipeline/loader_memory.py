"""The memory the feature loader (`pipeline.loader`) copies its bytes through, allocated once per
loader and reused every epoch: row slots in shared memory that the workers read each row into, where
it waits for its batch (`SlotPlan` says which slot and when), and batch buffers, handed out again
once nothing refers to them.

Fresh memory is what made the loader slow: on the VM it was measured on, a first touch costs a page
fault per 4 KiB (a new 201 MB array fills at 2.4 GB/s, a warm one at 16 GB/s), or, for numpy's
transparent huge pages, a compaction stall now and then (docs/benchmarks.md). Forked workers make
warm memory fresh again: while a child forked from the trainer lives, each page the trainer writes
is first copied for it (copy-on-write), so the batch buffers are `private_array`s, which a forked
child does not map.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import sys
import weakref
from dataclasses import dataclass
from queue import Empty

import numpy as np
import torch

from .errors import FlatDinoError

SHARED = "/dev/shm"  # where torch puts shared memory on Linux (a tmpfs: Docker's default is 64 MB)


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


MADV_POPULATE_WRITE = 23  # <linux/mman.h>, Linux >= 5.14


class RowSlots:
    """Row-sized slots in shared memory, one array per stored part, where each row read waits for
    its batch: a worker reads a block's rows straight into their slots (`SlotPlan`), and the main
    process copies each batch out of them. One copy per byte in the main process, none of it into
    new memory."""

    def __init__(self, parts: list[tuple[tuple[int, ...], type]], capacity: int):
        self.capacity = capacity
        nbytes = sum(capacity * int(np.prod(shape)) * np.dtype(t).itemsize for shape, t in parts)
        free = shutil.disk_usage(SHARED).free if os.path.isdir(SHARED) else nbytes
        if nbytes > free:  # else a bus error in the first process to touch a page past the end
            raise FlatDinoError(
                f"the feature loader needs {nbytes / 1e9:.2f} GB of shared memory ({SHARED}) for "
                f"its row slots and {free / 1e9:.2f} GB is free; give the container more "
                "(`docker run --shm-size 16g`), or pass a smaller --micro-batch"
            )
        dtypes = {np.dtype(np.float16): torch.float16, np.dtype(np.int8): torch.int8}
        self.tensors = [
            torch.empty((capacity, *shape), dtype=dtypes[np.dtype(dtype)]).share_memory_()
            for shape, dtype in parts
        ]

    def prefault(self) -> None:
        """Map every page of the slots into this process at once (Linux's MADV_POPULATE_WRITE),
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
        """The slots as numpy arrays (views: not attributes, or a spawned worker would be sent
        their bytes)."""
        return [t.numpy() for t in self.tensors]

    def take(self, slots: np.ndarray, into: Batches) -> list[np.ndarray]:
        """The rows in `slots`, in that order, copied into a buffer of `into` with `np.take`
        (torch 2.14's CPU stack of float16 rows copies at 0.1-1 GB/s here, numpy at ~20 GB/s;
        its default mode="raise" copies through a temporary array, new memory again)."""
        out = into.get(len(slots))
        for array, part in zip(self.arrays(), out, strict=True):
            np.take(array, slots, axis=0, out=part, mode="clip")  # slots are valid indices
        return out


@dataclass
class SlotPlan:
    """Where each row of an epoch waits between its block and its batch, fixed before any byte is
    read: `slot[row]`, and for block position p the number of batches, `after[p]`, the main
    process must have copied out before a worker may write block p (its slots are theirs).

    A block only takes slots that batches needing blocks before p - `ahead` gave back, so a worker
    never waits on a batch that needs its own block (no deadlock) nor, with `ahead` at least the
    blocks the DataLoader asks for in advance, on the batch being assembled."""

    slot: np.ndarray  # (N,) int64, -1 for a row not read this epoch
    after: np.ndarray  # (blocks,) int64, non-decreasing
    last_block: np.ndarray  # (batches,) the last block position each batch waits for
    capacity: int

    @classmethod
    def of(cls, batches: list[np.ndarray], blocks: list[np.ndarray], n: int, ahead: int):
        """The plan of `batches` (row indices) over `blocks` (the rows read from each block, in
        read order) for a store of `n` rows."""
        position = np.full(n, -1, np.int64)
        for p, rows in enumerate(blocks):
            position[rows] = p
        needs = [int(position[rows].max()) if len(rows) else -1 for rows in batches]
        last_block = np.maximum.accumulate(needs) if needs else np.zeros(0, np.int64)
        slot, after = np.full(n, -1, np.int64), np.zeros(len(blocks), np.int64)
        free: list[int] = []
        capacity = taken = 0
        for p, rows in enumerate(blocks):
            while taken < len(batches) and last_block[taken] < p - ahead:
                free.extend(slot[batches[taken]].tolist())  # copied out before p is written
                taken += 1
            after[p] = taken
            reused = min(len(free), len(rows))
            new = len(rows) - reused
            slot[rows] = free[len(free) - reused :] + list(range(capacity, capacity + new))
            del free[len(free) - reused :]
            capacity += new
        return cls(slot, after, last_block, capacity)


def wait_turn(queue, poll: float = 1.0) -> int | None:
    """The next permit from `queue`: None when handed None, or when the process that started
    this one has died (a worker waiting here would otherwise outlive a killed trainer)."""
    parent = os.getppid()
    while True:
        try:
            return queue.get(timeout=poll)
        except Empty:
            if os.getppid() != parent:
                return None


class Batches:
    """Batch buffers for `RowSlots.take`, each handed out as a new view and handed out again once
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
