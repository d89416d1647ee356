"""The ranks of a `flatdino sample` run under torchrun: joining the group, and waiting for each
other in a way that carries errors, so that no rank waits forever for one that failed.

Rank 0 alone checks the disk, opens the work folder and assembles the outputs, which for 50K
samples takes minutes; the other ranks wait for it on a gloo group (a wait on the host, with no
GPU stream involved) for at most --dist-timeout, and a rank that does not answer by then is named
in one line (trainers/waits.py), as a rank that fails is (`agree`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as torch_dist

from ..pipeline.errors import FlatDinoError
from ..trainers.runner import Dist, setup_distributed, teardown_distributed
from ..trainers.waits import bounded_waits

# how to continue after a rank stopped answering
RESUME = "finished batches are kept: the same command continues from them"


@contextmanager
def ranks(device: str, timeout_s: float) -> Iterator[tuple[Dist, object]]:
    """This process's place in the job and, with several ranks, the gloo group `agree` waits
    on, for at most `timeout_s` seconds (--dist-timeout); both are left at the end."""
    d = setup_distributed(device, timeout_s)
    group = None
    try:
        if d.world > 1:
            group = torch_dist.new_group(backend="gloo", timeout=d.timeout)
        with bounded_waits(d, "sample", RESUME):
            yield d, group
    finally:
        if group is not None and not d.owns_group:
            torch_dist.destroy_process_group(group)
        teardown_distributed(d)


def agree(d: Dist, group, error: Exception | None, payload=None):
    """Wait for every rank; when any failed, raise on all (the failing rank its own error, the
    others a one-line error naming it). Returns rank 0's `payload`."""
    if d.world == 1:
        if error is not None:
            raise error
        return payload
    shared: list = [None] * d.world
    message = None if error is None else f"{type(error).__name__}: {error}"
    torch_dist.all_gather_object(shared, (message, payload), group=group)
    if error is not None:
        raise error
    for rank, (message, _) in enumerate(shared):
        if message is not None:
            raise FlatDinoError(f"sample: rank {rank} failed: {message}")
    return shared[0][1]
