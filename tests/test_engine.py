"""The shard engine with a fake worker (the Ray path is covered by test_extract)."""

from flatdino.pipeline.engine import Placement, ShardJob, run_shards
from flatdino.pipeline.store import shard_bounds


class _Recorder:
    """A fake worker with the engine's signature: returns what it was given."""

    def __init__(self, tag: str):
        self.tag = tag

    def __call__(self, payload):
        return self.tag, payload


def _prepare(start: int, stop: int) -> list[int]:
    return list(range(start, stop))


def test_local_engine_runs_every_shard_once_in_order():
    shards = shard_bounds(50, 8)
    job = ShardJob(_prepare, lambda s: (s.start, s.stop), _Recorder, ("w",))
    results = list(run_shards(job, shards, Placement(backend="local")))
    assert [r[1] for r in results] == [list(range(s.start, s.stop)) for s in shards]
    assert {r[0] for r in results} == {"w"}
