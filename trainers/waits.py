"""Bounded waits between torchrun ranks: a rank that stops answering without dying (a stopped
process, a hung file system, a frozen node) ends the job within `--dist-timeout` with one line
that names it, instead of keeping the other ranks in a collective for the backend's default
(30 min for gloo, forever in some barriers).

Every process group gets `--dist-timeout` (trainers/runner.py, sampling/ranks.py). When a wait
fails, gloo says only which socket timed out, not which rank is missing, so the ranks that are
still running hold a roll call on the rendezvous store (served by the torchrun agent, which still
answers when a worker is stopped): each one checks in, waits a short grace for the others, and
names the ranks that never checked in.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta

import torch.distributed as dist

from ..pipeline.errors import FlatDinoError
from .runner import Dist

# The most a rank that timed out waits for the others to check in; they timed out in the same
# wait, so within seconds of each other unless one of them was busy alone (rank 0 writing a
# checkpoint), and that one is named too.
ROLL_CALL_GRACE = timedelta(seconds=30)


class RankTimeoutError(FlatDinoError):
    """A rank did not answer at a collective within --dist-timeout."""

    def __init__(self, message: str, missing: list[int]):
        super().__init__(message)
        self.missing = missing  # the ranks that did not check in


def is_timeout(e: BaseException) -> bool:
    """A collective that timed out: gloo's RuntimeError ("[.../gloo/transport/tcp/...] Timed out
    waiting 5000ms for recv ...") or torch's DistError (NCCL's watchdog, the store). A peer that
    died closes its connections instead, and that error propagates at once, unchanged."""
    text = str(e).lower()
    timed_out = "timed out" in text or "timeout" in text
    return timed_out and isinstance(e, (dist.DistError, RuntimeError))


def roll_call(store, rank: int, world: int, grace: timedelta) -> list[int] | None:
    """The ranks that have not checked in on `store` after `grace` (this rank checks in first);
    None when the store itself does not answer. A rank that checked in and left still counts:
    the keys stay in the store until the job ends."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # the agent's store outlives it
    try:
        calls = dist.PrefixStore(f"flatdino/roll-call/{restart}", store)
        calls.set_timeout(grace)
        calls.set(str(rank), "here")
        keys = [str(r) for r in range(world)]
        with suppress(dist.DistStoreError):  # someone never came: who, below
            calls.wait(keys, grace)
        return [r for r in range(world) if not calls.check([str(r)])]
    except (dist.DistError, RuntimeError):
        return None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


@contextmanager
def bounded_waits(d: Dist, what: str, fix: str) -> Iterator[None]:
    """Turn a collective that failed in the body into one line naming the ranks that did not
    answer (`what`: the command; `fix`: how to continue). A failure while every rank still
    answers is not a missing rank: it propagates unchanged."""
    try:
        yield
    except Exception as e:
        if d.world == 1 or d.store is None or not is_timeout(e):
            raise
        rank, timeout = d.rank, d.timeout
        missing = roll_call(d.store, rank, d.world, min(timeout, ROLL_CALL_GRACE))
        if missing == []:
            raise
        saw = f"rank {rank} saw {_first_line(e)}"
        if missing is None:
            message = (
                f"{what}: a wait on the other ranks failed and the rendezvous store does not "
                f"answer either (the torchrun agent's node is gone; {saw}); {fix}"
            )
        else:
            who = ("rank " if len(missing) == 1 else "ranks ") + ", ".join(map(str, missing))
            message = (
                f"{what}: {who} did not answer within --dist-timeout "
                f"{timeout.total_seconds():g} s (a stopped or hung process, a hung file system "
                f"or a lost node; {saw}); {fix}"
            )
        raise RankTimeoutError(message, missing or []) from None
