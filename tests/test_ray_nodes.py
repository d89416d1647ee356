"""Failures a cluster has (issue 15): extract-features on a two-node Ray cluster on this machine
(`ray start --head` and `ray start --address`, each with its own CPUs and temp dir). Node 2 is
SIGKILLed mid-job, raylet and workers with it; the job must finish on the head, every shard done
and the store bit-identical to a local run of the same config."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import assert_same_store, free_port, read_store, tiny_config
from flatdino.pipeline.extract import extract_features

RAY = str(Path(sys.executable).with_name("ray"))
SHARDS = 45  # digits val: 359 images in shards of 8 (the CLI's smallest)
# The GCS finds a SIGKILLed raylet by missed health checks (5 of 3 s by default): 3 of 1 s here
ENV = {
    **os.environ,
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
# ray.nodes() from a driver of its own once `want` nodes are alive: the test process may already
# hold another Ray (conftest's local_ray)
NODES = """import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
deadline = time.monotonic() + 60
while sum(n["Alive"] for n in ray.nodes()) != int(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.2)
print(json.dumps(ray.nodes(), default=str))"""


def start_node(log: Path, *args: str) -> subprocess.Popen:
    """`ray start --block ARGS` in a session of its own; its output into `log`."""
    cmd = [RAY, "start", "--block", "--disable-usage-stats", *args]
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, start_new_session=True
        )


def cluster_nodes(address: str, alive: int) -> dict[str, dict]:
    """NodeID -> ray.nodes()'s entry, the dead ones too, once `alive` nodes are alive."""
    cmd = [sys.executable, "-c", NODES, address, str(alive)]
    out = subprocess.run(cmd, env=ENV, check=True, capture_output=True, text=True, timeout=120)
    return {n["NodeID"]: n for n in json.loads(out.stdout.splitlines()[-1])}


def process(pid: int) -> tuple[int, int, str] | None:
    """(parent, process group, command line) of a running `pid`; None once it has ended (a zombie
    has ended too: it only waits for its reaper)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # state, ppid, ..
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return None
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[2]), cmdline)


def tree(pid: int) -> dict[int, tuple[int, str]]:
    """pid -> (process group, command line) of `pid` and every process below it."""
    running = {int(p.name): process(int(p.name)) for p in Path("/proc").glob("[0-9]*")}
    children: dict[int, list[int]] = {}
    for child, info in running.items():
        if info:
            children.setdefault(info[0], []).append(child)
    found, todo = {}, [pid]
    while todo:
        p = todo.pop()
        if running.get(p):
            found[p] = running[p][1:]
            todo.extend(children.get(p, []))
    return found


def kill_node(proc: subprocess.Popen) -> dict[int, tuple[int, str]]:
    """SIGKILL every process group of the node's tree: Ray starts each worker in a group of its
    own, so `ray start`'s group (raylet, agents) alone would leave the workers behind a while."""
    processes = tree(proc.pid)
    for group in {g for g, _ in processes.values()}:
        with contextlib.suppress(ProcessLookupError):  # the group ended meanwhile
            os.killpg(group, signal.SIGKILL)
    proc.wait()
    return processes


def still_running(processes: dict[int, tuple[int, str]], within: float = 10) -> list[str]:
    """The command lines of `processes` that have not ended `within` seconds from now."""
    deadline = time.monotonic() + within
    while True:
        left = [c for pid, (g, c) in processes.items() if (process(pid) or ())[1:] == (g, c)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def start_job(out: Path, address: str, log: Path) -> subprocess.Popen:
    args = [
        "extract-features",
        "--data",
        "digits",
        "--split",
        "val",
        "--out",
        str(out),
        "--backbone",
        "tiny",
        "--backend",
        "ray",
        "--ray-address",
        address,
        "--workers",
        "2",
        "--batch-size",
        "16",
        "--shard-size",
        "8",
        "--torch-threads",
        "1",
        "--no-progress",
    ]
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "flatdino.cli.main", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=ENV,
        )


@pytest.mark.slow
def test_a_killed_ray_node_loses_no_shard(tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="fd-ray-"))  # short: Ray's socket paths fit 107 bytes
    port = free_port()
    address, out, log = f"127.0.0.1:{port}", tmp_path / "ray.zarr", tmp_path / "job.log"
    # The head has room for both backbone actors (1 CPU each) and a decode task (1 CPU) once node 2
    # is gone. Own ports for the services that default to fixed ones: another Ray on this machine
    # is never in the way.
    head = start_node(
        tmp_path / "head.log",
        "--head",
        "--port",
        port,
        "--num-cpus",
        "3",
        "--temp-dir",
        str(ray_tmp / "head"),
        "--include-dashboard",
        "false",
        "--dashboard-port",
        free_port(),
        "--ray-client-server-port",
        free_port(),
    )
    nodes, job, on_node2, seen = [head], None, set(), set()
    try:
        # 3 CPUs: the engine's 4 decode tasks (1 CPU each; Ray keeps 2 on the head, < 50% busy,
        # then sends each to the least busy node) leave one for an actor, which SPREAD puts here.
        # With 2, decode tasks can fill node 2 before the actors are placed, and both go to the head.
        nodes.append(
            start_node(
                tmp_path / "node2.log",
                "--address",
                address,
                "--num-cpus",
                "3",
                "--temp-dir",
                str(ray_tmp / "node2"),
            )
        )
        [node2] = [
            i
            for i, n in cluster_nodes(address, 2).items()
            if "node:__internal_head__" not in n["Resources"]
        ]
        job = start_job(out, address, log)
        deadline = time.monotonic() + 120
        while job.poll() is None and time.monotonic() < deadline:
            on_node2 = {c for _, c in tree(nodes[1].pid).values() if c.startswith("ray::")}
            seen |= on_node2
            written = (out / "done" / "c").exists() and any((out / "done" / "c").iterdir())
            # Node 2's actor starts a fresh worker process (the head has prestarted ones), so it is
            # often still loading the backbone, its first two shards queued, when the head's actor
            # has written its first: either way a restart and retried calls are needed
            if written and any(c.startswith("ray::_Worker") for c in on_node2):
                break
            time.sleep(0.1)
        assert job.poll() is None and any(c.startswith("ray::_Worker") for c in on_node2), (
            f"no backbone actor on node 2 while the job ran (node 2 ran {sorted(seen)}): "
            + log.read_text()[-3000:]
        )
        killed = kill_node(nodes[1])
        done_at_kill = int(np.sum(zarr.open_group(str(out), mode="r")["done"][:]))
        assert 0 < done_at_kill < SHARDS
        assert any("/raylet " in c for _, c in killed.values())
        assert still_running(killed) == []  # raylet, agents and workers all ended
        assert not cluster_nodes(address, 1)[node2]["Alive"]  # the GCS has marked node 2 dead
        rc = job.wait(timeout=150)
    finally:
        if job is not None and job.poll() is None:
            job.kill()
        left = [still_running(kill_node(node)) for node in reversed(nodes)]
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert left == [[], []]  # no process of either node outlives the test
    assert rc == 0, log.read_text()[-3000:]
    arrays = read_store(out)
    assert arrays["done"].all() and len(arrays["done"]) == SHARDS
    local = tmp_path / "local.zarr"
    extract_features(tiny_config("digits", local, split="val", shard_size=8, torch_threads=1))
    assert_same_store(out, local)
