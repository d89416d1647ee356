"""The shard engine with a fake worker: local order, the Ray prepare pool's size and bound (the
extract job on Ray is covered by test_extract)."""

import sys
import time
from pathlib import Path

import pytest
from ray import cloudpickle

from flatdino.pipeline.engine import (
    Placement,
    ShardJob,
    check_decode_cpus,
    prepare_pool_size,
    run_shards,
)
from flatdino.pipeline.errors import FlatDinoError
from flatdino.pipeline.store import shard_bounds


class _Recorder:
    """A fake worker with the engine's signature: returns what it was given."""

    def __init__(self, tag: str, seconds: float = 0.0):
        self.tag, self.seconds = tag, seconds

    def __call__(self, payload):
        time.sleep(self.seconds)  # a slow backbone: prepared payloads pile up in front of it
        return self.tag, payload


def _prepare(start: int, stop: int) -> list[int]:
    return list(range(start, stop))


def _prepare_and_mark(start: int, stop: int, folder: str) -> list[int]:
    (Path(folder) / str(start)).touch()  # the driver counts the prepares that have run
    return list(range(start, stop))


def test_local_engine_runs_every_shard_once_in_order():
    shards = shard_bounds(50, 8)
    job = ShardJob(_prepare, lambda s: (s.start, s.stop), _Recorder, ("w",))
    results = list(run_shards(job, shards, Placement(backend="local")))
    assert [r[1] for r in results] == [list(range(s.start, s.stop)) for s in shards]
    assert {r[0] for r in results} == {"w"}


@pytest.mark.parametrize(
    "cpus, workers, per_cpu, size",
    [
        (2, 1, 1, 2),
        (2, 1, 2, 2),
        (16, 1, 1, 15),
        (16, 1, 2, 30),
        (64, 8, 1, 56),
        (4, 4, 3, 8),
        (1, 2, 1, 4),
    ],
)
def test_the_prepare_pool_fills_the_cpus_the_actors_leave(cpus, workers, per_cpu, size):
    """One prepare per free CPU (x per_cpu), never fewer than two per actor."""
    assert prepare_pool_size(cpus, workers, per_cpu) == size


def test_ray_engine_runs_every_shard_once_with_bounded_look_ahead(local_ray, tmp_path):
    """A slow worker and instant prepares: when the first result arrives, at most pool (2 on the
    2-CPU test cluster: 1 free CPU, 2 per actor) + 2 calls per actor shards have been prepared,
    not all of them; every shard's result comes back exactly once."""
    shards = shard_bounds(96, 8)  # 12 shards
    job = ShardJob(
        _prepare_and_mark, lambda s: (s.start, s.stop, str(tmp_path)), _Recorder, ("w", 0.3)
    )
    placement = Placement(backend="ray", workers=1, num_gpus_per_worker=0)
    results, prepared_at_first = [], None
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers lack tests/
    try:
        for result in run_shards(job, shards, placement):
            if prepared_at_first is None:
                prepared_at_first = len(list(tmp_path.iterdir()))
            results.append(result[1])
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert 1 <= prepared_at_first <= prepare_pool_size(2, 1, 1) + 2
    assert sorted(results) == [list(range(s.start, s.stop)) for s in shards]


def test_actors_that_take_every_cpu_are_refused_not_left_waiting(local_ray):
    """Two actors on the 2-CPU test cluster would leave no CPU for a decode task, and the job would
    wait forever: refused in one line before any actor starts. Half a free CPU is enough for two
    decode tasks per CPU."""
    job = ShardJob(_prepare, lambda s: (s.start, s.stop), _Recorder, ("w",))
    placement = Placement(backend="ray", workers=2, num_gpus_per_worker=0)
    with pytest.raises(
        FlatDinoError,
        match=r"^--workers 2 backbone actors reserve 2 of the Ray "
        r"cluster's 2 CPUs and leave 0 for decoding .*use fewer --workers",
    ):
        list(run_shards(job, shard_bounds(16, 8), placement))
    check_decode_cpus(2.5, 2, 2)  # 0.5 CPU free, tasks of 0.5 CPU
    with pytest.raises(FlatDinoError, match="leave 0.5 for decoding"):
        check_decode_cpus(2.5, 2, 1)
