"""The shard engine shared by the pipeline's jobs (extract-features now, encode-latents next).

A job is a list of shards and two plain pieces of Python:

    prepare(*prepare_args(shard)) -> payload       CPU work (decode, read), a Ray task
    worker = worker_cls(*worker_args)              loaded once (a model), a Ray actor
    worker(payload) -> result                      GPU work + the shard's write

`run_shards` calls them in-process (backend "local", one prepare of look-ahead on a thread) or on
Ray (a pool of prepare tasks sized to the cluster's free CPUs feeding a pool of actors with two
shards in flight each), yielding results as shards finish. Both backends run the same functions on
the same shards.
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

log = logging.getLogger("flatdino.engine")


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
    # prepare (decode) tasks per CPU core the actors leave free (Ray backend): each asks for 1/k
    # CPU, so k > 1 oversubscribes the cores, for prepares that wait on storage
    decode_per_cpu: int = 1


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


ACTOR_CPUS = 1  # CPUs an actor reserves (its driver thread, input copies); the rest decode
# The object-storage settings obstore reads that are not secrets: the driver's values reach the
# workers. Credentials never do (Ray writes every runtime_env, values included, to a log file of
# each node): each node reads its own (docs/stores.md#credentials-on-a-ray-cluster).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ALLOW_HTTP",
    "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_ALLOW_HTTP",
    "AZURE_STORAGE_USE_EMULATOR",
)
RETRIES = 4  # re-runs of a task, restarts of an actor, after its node or process died


def prepare_pool_size(cluster_cpus: float, workers: int, per_cpu: int) -> int:
    """Prepare tasks kept in flight: every CPU the actors leave free, `per_cpu` tasks each, and at
    least two per actor (one running on the actor, one ready behind it)."""
    return max(2 * workers, int(max(cluster_cpus - workers * ACTOR_CPUS, 0) * per_cpu))


def check_decode_cpus(cluster_cpus: float, workers: int, per_cpu: int) -> None:
    """Refuse a placement whose actors reserve every CPU: no decode task could ever start, and
    the job would wait forever."""
    free = cluster_cpus - workers * ACTOR_CPUS
    if free < 1 / per_cpu:
        raise FlatDinoError(
            f"--workers {workers} backbone actors reserve {workers * ACTOR_CPUS} of the Ray "
            f"cluster's {cluster_cpus:g} CPUs and leave {max(free, 0):g} for decoding (a decode task "
            f"needs {1 / per_cpu:g}): use fewer --workers or a cluster with more CPUs"
        )


def _forwarded_env() -> dict:
    """The driver's non-secret object-storage settings (endpoint, region, http), as a runtime_env
    for its tasks and actors, so that a store URL names the same place on every node."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    return {"env_vars": env} if env else {}


def _say_what_is_forwarded(env: dict) -> None:
    """One log line: which settings the workers get from the driver, and that secrets stay."""
    names = ", ".join(env.get("env_vars", {})) or "no storage settings"
    log.info(
        "Ray workers get %s from this shell; storage credentials are never forwarded: each "
        "node reads its own (instance role, workload identity, or the env where `ray start` ran)",
        names,
    )


def _start_actors(job: ShardJob, placement: Placement, gpus: float, env: dict) -> list:
    """The worker actors; restarted (model loaded again) and their calls retried after a crash."""
    import ray

    options = {"runtime_env": env}
    if placement.workers > 1:
        options["scheduling_strategy"] = "SPREAD"
    actor_cls = ray.remote(
        num_cpus=ACTOR_CPUS, num_gpus=gpus, max_restarts=RETRIES, max_task_retries=RETRIES
    )(_Worker).options(**options)
    args = (job.worker_cls, job.worker_args, placement.threads, placement.workers)
    return [actor_cls.remote(*args) for _ in range(placement.workers)]


def _run_ray(job: ShardJob, todo: list[Shard], placement: Placement) -> Iterator[Any]:
    """A pool of prepare tasks as large as the free CPUs allow; finished payloads go to actors with
    fewer than two calls outstanding. At most `pool` prepared payloads wait for an actor, so memory
    stays bounded however far decoding runs ahead."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=placement.ray_address, include_dashboard=False, logging_level=logging.WARNING
        )
    gpus = placement.num_gpus_per_worker
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    cpus = ray.cluster_resources().get("CPU", 0)
    env = _forwarded_env()
    _say_what_is_forwarded(env)
    actors: list = []
    preparing: set = set()  # prepare ObjectRefs running, or finished and not yet seen by wait
    try:
        check_decode_cpus(cpus, placement.workers, placement.decode_per_cpu)
        pool = prepare_pool_size(cpus, placement.workers, placement.decode_per_cpu)
        prepare = ray.remote(num_cpus=1 / placement.decode_per_cpu, max_retries=RETRIES)(
            job.prepare
        ).options(runtime_env=env)
        actors = _start_actors(job, placement, gpus, env)
        queue = list(reversed(todo))
        ready: list = []  # prepare ObjectRefs finished, oldest first
        # actor call ObjectRef -> actor. Each shard is submitted once: Ray re-runs a call whose
        # actor died (max_task_retries), so every ref yields one result
        calls: dict = {}
        busy = dict.fromkeys(actors, 0)  # calls outstanding per actor (at most 2)
        while queue or preparing or ready or calls:
            while queue and len(preparing) + len(ready) < pool:
                preparing.add(prepare.remote(*job.prepare_args(queue.pop())))
            while ready and min(busy.values()) < 2:
                actor = min(actors, key=busy.get)
                calls[actor.__call__.remote(ready.pop(0))] = actor
                busy[actor] += 1
            [ref], _ = ray.wait([*preparing, *calls], num_returns=1)
            if ref in preparing:  # a failed prepare is handed over too: its call raises the error
                preparing.remove(ref)
                ready.append(ref)
                continue
            busy[calls.pop(ref)] -= 1
            yield _get_unwrapped(ref)
    finally:
        for ref in preparing:
            ray.cancel(ref)
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
