"""The shard engine shared by the pipeline's jobs (extract-features now, encode-latents next).

A job is a list of shards and two plain pieces of Python:

    prepare(*prepare_args(shard)) -> payload       CPU work (decode, read), a Ray task
    worker = worker_cls(*worker_args)              loaded once (a model), a Ray actor
    worker(payload) -> result                      GPU work + the shard's write

`run_shards` calls them in-process (backend "local", one prepare of look-ahead on a thread) or on
Ray (prepare as CPU tasks, a pool of actors with two shards in flight each), yielding results as
shards finish. Both backends run the same functions on the same shards.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .errors import FlatDinoError
from .store import Shard


@dataclass(frozen=True)
class ShardJob:
    """What to run for each shard; `prepare` and `worker_cls` must be importable (picklable)."""

    prepare: Callable[..., Any]  # module-level function: prepare(*prepare_args(shard)) -> payload
    prepare_args: Callable[[Shard], tuple]  # runs in the driver; keep its result small
    worker_cls: type  # worker_cls(*worker_args)(payload) -> result
    worker_args: tuple


@dataclass(frozen=True)
class Placement:
    """Where the workers run."""

    backend: str = "ray"  # ray | local
    workers: int = 1  # actors (Ray backend)
    num_gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    ray_address: str | None = None  # None: start Ray locally; "auto" or ADDR: join a cluster
    # torch intra-op threads per worker. N: N threads; 0: a Ray actor (a process of its own) takes
    # its node's cpu count / workers; None, and 0 on the local backend: torch's setting is left as is
    threads: int | None = None


class _Worker:
    """Builds `cls(*args)`; a FlatDinoError in the constructor is raised from the first call.

    Ray keeps the exception object of a failed call (RayTaskError.cause) but only the text of a
    failed actor creation, so workers' set-up errors must surface from a call to stay one line.
    """

    def __init__(self, cls: type, args: tuple, threads: int | None = None, share_of: int = 0):
        """`share_of` W (Ray actors): `threads` 0 means this node's cpu count / W."""
        if threads == 0 and share_of:
            threads = max(1, (os.cpu_count() or 1) // share_of)
        if threads:
            torch.set_num_threads(threads)
        self.error: FlatDinoError | None = None
        try:
            self.worker = cls(*args)
        except FlatDinoError as e:
            self.error = e

    def __call__(self, payload: Any) -> Any:
        if self.error is not None:
            raise self.error
        return self.worker(payload)


def run_shards(job: ShardJob, todo: list[Shard], placement: Placement) -> Iterator[Any]:
    """Run `job` over `todo`, yielding each shard's result as it finishes."""
    run = _run_ray if placement.backend == "ray" else _run_local
    yield from run(job, todo, placement)


def _run_local(job: ShardJob, todo: list[Shard], placement: Placement) -> Iterator[Any]:
    threads = torch.get_num_threads()  # the caller's, given back when the job ends
    try:
        worker = _Worker(job.worker_cls, job.worker_args, placement.threads)
        with ThreadPoolExecutor(max_workers=1) as pool:  # prepare shard s+1 while s runs
            pending = [pool.submit(job.prepare, *job.prepare_args(s)) for s in todo[:2]]
            for i in range(len(todo)):
                payload = pending.pop(0).result()
                if i + 2 < len(todo):
                    pending.append(pool.submit(job.prepare, *job.prepare_args(todo[i + 2])))
                yield worker(payload)
    finally:
        torch.set_num_threads(threads)


def _run_ray(job: ShardJob, todo: list[Shard], placement: Placement) -> Iterator[Any]:
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=placement.ray_address, include_dashboard=False, logging_level=logging.WARNING
        )
    gpus = placement.num_gpus_per_worker
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    prepare = ray.remote(num_cpus=1)(job.prepare)
    actor_cls = ray.remote(num_cpus=1, num_gpus=gpus)(_Worker)
    actors = [
        actor_cls.remote(job.worker_cls, job.worker_args, placement.threads, placement.workers)
        for _ in range(placement.workers)
    ]
    queue = list(reversed(todo))
    inflight: dict = {}  # ObjectRef -> actor; two shards per actor: one preparing, one running

    def submit(actor) -> None:
        payload = prepare.remote(*job.prepare_args(queue.pop()))
        inflight[actor.__call__.remote(payload)] = actor

    for actor in actors * 2:
        if queue:
            submit(actor)
    try:
        while inflight:
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            actor = inflight.pop(ref)
            result = _get_unwrapped(ref)
            if queue:
                submit(actor)
            yield result
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()


def _get_unwrapped(ref):
    """ray.get, but a FlatDinoError raised in a worker surfaces as itself (one-line CLI error)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, FlatDinoError):
            raise type(cause)(str(cause)) from None
        raise
