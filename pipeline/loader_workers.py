"""The feature loader's workers (`pipeline.loader`): DataLoader worker processes that read blocks
of a feature store into the loader's shared memory (`pipeline.loader_memory`), each block once the
main process has handed it its turn, and the messages that reach them on their queues."""

from __future__ import annotations

import os
from queue import Empty

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .feature_store import FeatureStore
from .loader_memory import RowSlots


class BlockReader(IterableDataset):
    """Reads blocks, each row's drawn view into its batch's buffer or its row slot (`SlotPlan`),
    and yields the block's position once it is in. Its workers live as long as the loader's memory
    (DataLoader's persistent workers): one iteration per epoch, the n-th of which reads the
    epoch the main process tagged n. Worker w's queue carries the epoch's plan, then the turn of
    each of its blocks (positions w, w + W, ...: their places are free), any batch buffer replaced
    since (a caller kept a batch) and the epoch's end; what an earlier epoch left in it is
    skipped. An int is all that crosses to the main process: DataLoader sends an array as a tensor
    in new shared memory, one file descriptor handed over per block (8 ms of the main process's
    time)."""

    def __init__(
        self, path: str, block_rows: int, slots: RowSlots, ring: list[RowSlots], turns: list
    ):
        self.path, self.block_rows, self.turns = path, block_rows, turns
        self.slots, self.ring = slots, list(ring)  # ring: in the order of BatchRing.memory
        self.epochs = 0  # iterations started in this process
        self.store: FeatureStore | None = None  # opened in the worker (path or URL), once

    def __iter__(self):
        self.epochs += 1  # here, not in the generator: an epoch left early may never run it
        return self._epoch(self.epochs)

    def _epoch(self, tag: int):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.store is None:  # this process's first epoch
            self.store = FeatureStore(self.path)
            for memory in (self.slots, *self.ring):
                memory.prefault()
        queue = self.turns[worker]
        got = self._next(queue, tag)
        if got is None or got[0] != "epoch":  # the epoch ended before it began here
            return
        blocks, views, slot, batch, index, first = got[2:]
        needed = batch >= 0
        for p in range(worker, len(blocks), workers):
            lo, hi, rows = block_of(needed, int(blocks[p]), self.block_rows)
            got = self._next(queue, tag)
            if got is None or got[0] != "turn":  # the epoch was left early, or the main
                return  # process is gone
            slots = self.slots.arrays()
            turned = self.ring[first:] + self.ring[:first]  # batch t's buffer: turned[t % R]
            buffers = [b.arrays() for b in turned]
            into: list[list[np.ndarray]] = [[] for _ in slots]  # per part, each row's place
            for s, t, j in zip(
                slot[rows].tolist(), batch[rows].tolist(), index[rows].tolist(), strict=True
            ):
                for k, part in enumerate(into):
                    part.append(slots[k][s] if s >= 0 else buffers[t % len(buffers)][k][j])
            self.store.read_drawn(lo, hi, rows, views[rows], into=into)
            yield p

    def _next(self, queue, tag: int) -> tuple | None:
        """The next message of epoch `tag` on `queue`, once any batch buffer replaced before it is
        in place (and mapped), skipping what earlier epochs left; None when the main process is
        gone."""
        while True:
            got = wait_turn(queue)
            if got is None:
                return None
            if got[0] == "buffer":
                _, i, self.ring[i] = got
                self.ring[i].prefault()
            elif got[1] == tag:
                return got


def block_of(needed: np.ndarray, block: int, block_rows: int) -> tuple[int, int, np.ndarray]:
    """The bounds [lo, hi) of `block` and its rows still `needed` ((N,) bool)."""
    lo, hi = block * block_rows, min((block + 1) * block_rows, len(needed))
    return lo, hi, np.flatnonzero(needed[lo:hi]) + lo


def wait_turn(queue, poll: float = 1.0):
    """The next message from `queue` (a block's turn, or a replaced batch buffer): None when
    handed None, or when the process that started this one has died (a worker waiting here would
    otherwise outlive a killed trainer)."""
    parent = os.getppid()
    while True:
        try:
            return queue.get(timeout=poll)
        except Empty:
            if os.getppid() != parent:
                return None
