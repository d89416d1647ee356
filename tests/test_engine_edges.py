"""pipeline/engine.py's Ray plumbing without a cluster (ray's calls faked): a worker's share of
the node's threads, actors spread over nodes, Ray started and stopped by the job itself, and a
worker error that is not flatdino's passed on as Ray raised it."""

from __future__ import annotations

import os

import pytest
import ray
import torch

from flatdino.pipeline import engine
from flatdino.pipeline.engine import Placement, ShardJob, _Worker
from flatdino.pipeline.errors import FlatDinoError


def test_a_ray_worker_given_zero_threads_takes_its_share_of_the_node():
    before = torch.get_num_threads()
    try:
        _Worker(dict, (), threads=0, share_of=2)
        assert torch.get_num_threads() == max(1, (os.cpu_count() or 1) // 2)
    finally:
        torch.set_num_threads(before)


class FakeActorClass:
    def __init__(self):
        self.options_seen = None

    def __call__(self, cls):
        return self

    def options(self, **options):
        self.options_seen = options
        return self

    def remote(self, *args):
        return args


def test_several_actors_are_spread_over_the_nodes(monkeypatch):
    fake = FakeActorClass()
    monkeypatch.setattr(ray, "remote", lambda **kw: fake)
    job = ShardJob(print, lambda s: (), dict, ("x",))
    actors = engine._start_actors(job, Placement(workers=3, threads=0), 0, {"env_vars": {}})
    assert fake.options_seen == {"runtime_env": {"env_vars": {}}, "scheduling_strategy": "SPREAD"}
    assert actors == [(dict, ("x",), 0, 3)] * 3


def test_a_job_that_started_ray_shuts_it_down_even_when_refused(monkeypatch):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(("init", kw["address"])))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("shutdown", None)))
    job = ShardJob(print, lambda s: (), dict, ())
    placement = Placement(workers=1, num_gpus_per_worker=0, ray_address="auto")
    with pytest.raises(FlatDinoError, match="^--workers 1 backbone actors reserve 1 of the Ray"):
        list(engine._run_ray(job, [], placement))
    assert calls == [("init", "auto"), ("shutdown", None)]


def test_a_worker_error_that_is_not_flatdinos_is_raised_as_ray_raised_it(monkeypatch):
    error = ray.exceptions.RayTaskError("f", "Traceback ...", ValueError("bad pixel"))

    def get(ref):
        raise error

    monkeypatch.setattr(ray, "get", get)
    with pytest.raises(ray.exceptions.RayError) as raised:
        engine._get_unwrapped(object())
    assert raised.value is error
