"""Failures a cluster has (issue 15): train-dit on two torchrun "nodes" (c10d rendezvous, gloo)
that share one run folder; one node dies, the other must fail fast, and `--resume` on both
continues from the last checkpoint, every rank at the same step."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fake_latents_store, free_port, tiny_dit_args

STEPS = 20  # enough that the kill (at the first checkpoint, step 2) lands in the middle


def start_node(i: int, port: str, run: Path, store: Path, *extra: str) -> subprocess.Popen:
    """One node: its own torchrun agent, one gloo rank; stdout and stderr into RUN/../node{i}.log."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "job15",
        "--max-restarts",
        "0",
        "-m",
        "flatdino.cli.main",
        *tiny_dit_args(store, run, STEPS, "--ckpt-every", "2", "--log-to", "none", *extra),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(run.parent / f"node{i}{'-resume' if extra else ''}.log", "w") as log:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def wait_listening(port: str, proc: subprocess.Popen, within: float = 60) -> None:
    """Until node 1's agent hosts the rendezvous store, so that node 1, not node 2, is its host."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", int(port))) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"node 1 hosts no rendezvous store on port {port} (rc {proc.poll()})")


def process_groups(pid: int) -> set[int]:
    """The process groups of `pid` and its descendants. torchrun starts each worker in a session
    of its own, so killing the agent's group alone leaves the worker training: a dead node is
    every group of its tree."""
    children: dict[int, list[tuple[int, int]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
        except OSError:  # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append((int(stat.parent.name), int(fields[2])))
    try:
        groups, todo = {os.getpgid(pid)}, [pid]
    except ProcessLookupError:
        return set()
    while todo:
        for child, group in children.get(todo.pop(), []):
            groups.add(group)
            todo.append(child)
    return groups


def kill_node(proc: subprocess.Popen) -> None:
    for group in process_groups(proc.pid):
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.killpg(group, signal.SIGKILL)
    proc.wait()


def tail(path: Path) -> str:
    return path.read_text()[-3000:]


def metrics_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_dead_node_fails_the_other_and_both_resume_from_the_last_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    store = fake_latents_store(
        tmp_path / "lat.zarr",
        rng.standard_normal((64, 1, 8, 16)).astype(np.float32),
        np.arange(64) % 4,
    )
    run, port = tmp_path / "run", free_port()  # one --out for both nodes: the shared filesystem
    nodes: list[subprocess.Popen] = []
    try:
        nodes = [start_node(1, port, run, store)]
        wait_listening(port, nodes[0])
        nodes.append(start_node(2, port, run, store))
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "trainer.pt").exists() and time.monotonic() < deadline:
            assert all(p.poll() is None for p in nodes), tail(tmp_path / "node1.log")
            time.sleep(0.05)
        assert all(p.poll() is None for p in nodes), "the run ended before node 2 could be killed"
        kill_node(nodes[1])
        try:  # gloo sees the peer's closed connection; --max-restarts 0: the agent gives up
            rc = nodes[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill_node(nodes[0])
            raise AssertionError("node 1 still runs 60 s after node 2 died") from None
        log1 = (tmp_path / "node1.log").read_text()
        assert rc != 0 and "gloo/transport/tcp" in log1, log1[-3000:]  # a failed collective
        ck = run / "checkpoints"
        ck = ck if ck.exists() else run / ".checkpoints.old"  # killed between a save's renames
        saved = torch.load(ck / "trainer.pt", weights_only=True)["state"]["step"]
        before = metrics_steps(run)
        assert 2 <= saved < STEPS and saved % 2 == 0 and before == list(range(1, len(before) + 1))
        assert len(before) >= saved  # rank 0 logs a step before it saves it

        nodes = [start_node(1, port, run, store, "--resume")]
        wait_listening(port, nodes[0])
        nodes.append(start_node(2, port, run, store, "--resume"))
        rcs = [p.wait(timeout=180) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                kill_node(p)
    outs = [tail(tmp_path / f"node{i}-resume.log") for i in (1, 2)]
    assert rcs == [0, 0], "\n".join(outs)
    # every rank found the same checkpoint (resume._agree gathers them) and ended at the last step
    assert all(f"{run}: done at step {STEPS}" in o for o in outs)
    assert f"resumed from {ck} at step {saved}" in (run / "log.txt").read_text()
    after = metrics_steps(run)[len(before) :]
    assert after == list(range(saved + 1, STEPS + 1))  # continued there, one line per step
    final = torch.load(run / "checkpoints" / "trainer.pt", weights_only=True)
    assert final["state"]["step"] == STEPS and len(final["rng"]) == 2  # both ranks in the save
