"""One writer per run folder or store (pipeline/lock.py): a second writer is refused in one line
naming the holder, a killed holder's lock is taken over with a warning, a lease on S3 runs out."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import fake_latents_store, tiny_config
from flatdino.cli.main import app
from flatdino.pipeline import lock
from flatdino.pipeline import store as store_module
from flatdino.pipeline.extract import extract_features
from flatdino.pipeline.lock import LOCK_NAME, Holder, LockedError, WriterLock, writer_lock
from flatdino.pipeline.storage import Location

runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})


def refused(*args) -> str:
    """The command exits 1 with one `error:` line (no traceback); that line."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the job ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


def spawn(*args) -> subprocess.Popen:
    """`flatdino ARGS` in a process of its own (one thread)."""
    cmd = [sys.executable, "-m", "flatdino.cli.main", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def kill(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL (nothing when it has ended already)
    proc.wait()


def holder(where: str | Path) -> Holder | None:
    raw = Location(str(where)).read(LOCK_NAME)
    return None if raw is None else Holder.parse(raw)


# --------------------------------------------------------------------------- trainers


def test_a_second_train_dit_is_refused_and_resume_takes_over_a_killed_one(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 8)
    store = fake_latents_store(
        tmp_path / "latents.zarr", rng.normal(size=(32, 1, 8, 16)).astype(np.float32), labels
    )
    run = tmp_path / "run"
    args = ["--latents", store, "--out", run, "--preset", "tiny", "--steps", "100000"]
    args += ["--batch-size", "8", "--ckpt-every", "2", "--log-every", "1000", "--device", "cpu"]
    args += ["--sample-every", "0", "--no-progress"]
    proc = spawn("train-dit", *args)
    try:
        wait_for((run / "checkpoints" / "trainer.pt").exists, proc, "checkpoint")
        line = refused("train-dit", *args, "--resume")  # a re-queued job while the first runs
        assert f"pid {proc.pid} on " in line and "train-dit" in line, line
    finally:
        kill(proc)
    assert holder(run).pid == proc.pid  # SIGKILL leaves the lock
    ckpt = next(p for p in (run / "checkpoints", run / ".checkpoints.old") if p.exists())
    step = torch.load(ckpt / "trainer.pt", weights_only=True)["state"]["step"]  # what resume finds
    resumed = runner.invoke(app, ["train-dit", *map(str, args), "--resume", "--stop-after", "1"])
    assert resumed.exit_code == 0, resumed.output
    assert f"taking over the lock of pid {proc.pid} on " in resumed.output  # the warning line
    state = torch.load(run / "checkpoints" / "trainer.pt", weights_only=True)["state"]
    assert state["step"] == step + 1  # resumed where the killed run's checkpoint was
    assert not (run / LOCK_NAME).exists()  # released at the end


# --------------------------------------------------------------------------- stores


def image_folder(root: Path, fifo: bool = False) -> Path:
    """Two classes of two images; with `fifo` the first is a named pipe: a job that reads it
    blocks there (as on a stalled network disk), alive and holding its lock."""
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), (90 * i, 100, 0)).save(root / c / f"{i}.png")
    if fifo:
        (root / "a" / "0.png").unlink()
        os.mkfifo(root / "a" / "0.png")
    return root


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_extract_is_refused_and_the_next_run_takes_over(where, tmp_path, request):
    out = f"{request.getfixturevalue('s3')}/f.zarr" if where == "s3" else str(tmp_path / "f.zarr")
    images = image_folder(tmp_path / "images", fifo=True)
    args = ["extract-features", "--data", images, "--out", out, "--backbone", "tiny"]
    args += ["--backend", "local", "--batch-size", "16", "--shard-size", "16", "--no-progress"]
    proc = spawn(*args)
    try:  # wait until the store exists: the job then blocks on the pipe
        wait_for(lambda: (Location(out).attrs() or {}).get("creating") is False, proc, "store")
        keys = Location(out).keys()
        line = refused(*args, "--overwrite")
        assert f"--out {out!r} is being written by pid {proc.pid} on " in line, line
        assert Location(out).keys() == keys  # --overwrite was refused before deleting anything
    finally:
        kill(proc)
    assert holder(out).pid == proc.pid  # SIGKILL leaves the lock
    (images / "a" / "0.png").unlink()
    Image.new("RGB", (40, 40)).save(images / "a" / "0.png")  # the disk is back
    resumed = runner.invoke(app, list(map(str, args)))  # the same job, run again
    assert resumed.exit_code == 0, resumed.output
    assert f"taking over the lock of pid {proc.pid} on " in resumed.output
    assert Location(out).attrs()["complete"] and holder(out) is None  # done, and released


def test_overwrite_deletes_the_store_but_not_its_own_lock(tmp_path, monkeypatch):
    images = image_folder(tmp_path / "images")
    out = tmp_path / "f.zarr"
    extract_features(tiny_config(str(images), out))
    seen, create = [], store_module.create

    def spy(*args, **kwargs):  # the store was deleted; the job's lock must still be there
        seen.append((sorted(p.name for p in out.iterdir()), holder(out)))
        return create(*args, **kwargs)

    monkeypatch.setattr(store_module, "create", spy)
    extract_features(tiny_config(str(images), out, overwrite=True))
    assert seen[0][0] == [LOCK_NAME] and seen[0][1].pid == os.getpid()
    assert holder(out) is None and Location(str(out)).attrs()["complete"]
    with writer_lock(tmp_path / "new", "--out"):  # a folder made for the lock alone goes with it
        assert (tmp_path / "new" / LOCK_NAME).exists()
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------- the rules


def foreign(**kw) -> bytes:
    base = Holder("elsewhere", 1, 0.0, "2020-01-01T00:00:00Z", "flatdino x", "t", time.time(), 60.0)
    return dataclasses.replace(base, **kw).to_bytes()


def test_dead_reused_and_unreadable_holders_on_this_host_are_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = Holder.me(60.0)
    cases = {
        "that process has ended": foreign(host=lock.HOST, pid=dead.pid),
        "reused pid": foreign(host=lock.HOST, pid=os.getpid(), proc_start=me.proc_start - 50),
        "unreadable": b"{not json",
    }
    for name, record in cases.items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        (folder / LOCK_NAME).write_bytes(record)
        caplog.clear()
        with caplog.at_level(logging.WARNING, "flatdino.lock"), writer_lock(folder, "--out"):
            assert holder(folder).pid == os.getpid(), name
        assert "taking over" in caplog.text, name
        assert not (folder / LOCK_NAME).exists()
    live = tmp_path / "live"
    live.mkdir()
    (live / LOCK_NAME).write_bytes(
        foreign(host=lock.HOST, pid=os.getpid(), proc_start=me.proc_start)
    )
    with pytest.raises(LockedError, match=f"pid {os.getpid()} on .* since 2020-01-01T00:00:00Z"):
        WriterLock(live, "--out").acquire()
    assert (live / LOCK_NAME).read_bytes().startswith(b"{")  # a refused writer changes nothing


def test_a_lease_on_s3_is_renewed_while_held_and_runs_out_after_a_crash(s3, monkeypatch, caplog):
    url = f"{s3}/f.zarr"
    lease = 1.0
    # a holder on another host that stopped renewing: refused until its lease runs out
    assert lock._Objects(Location(url)).create(foreign(lease_s=lease)) is not None
    with pytest.raises(LockedError, match="pid 1 on elsewhere"):
        WriterLock(url, "--out", lease).acquire()
    time.sleep(lease + 0.2)
    with (
        caplog.at_level(logging.WARNING, "flatdino.lock"),
        writer_lock(url, "--out", lease_s=lease),
    ):
        assert "its lease ran out" in caplog.text
        first = holder(url)
        monkeypatch.setattr(lock, "HOST", "another-host")  # a second writer elsewhere
        time.sleep(2 * lease)  # longer than the lease: only renewals keep it
        assert holder(url).renewed > first.renewed + lease / 2
        with pytest.raises(LockedError, match=f"pid {os.getpid()} on "):
            WriterLock(url, "--out", lease).acquire()
    assert holder(url) is None  # released


# --------------------------------------------------------------------------- races and failures


def test_a_holder_whose_process_is_someone_elses_counts_as_alive(monkeypatch):
    def denied(pid):
        raise lock.psutil.AccessDenied(pid)

    monkeypatch.setattr(lock.psutil, "Process", denied)
    assert lock.process_runs(1, 0.0) is True


def test_a_lock_file_deleted_between_two_reads_is_neither_replaced_nor_deleted(tmp_path):
    files = lock._Files(tmp_path)
    assert files.read() is None  # no lock file at all
    assert files.replace(b"new", b"old") is None  # gone before the flock
    files.delete(b"old")  # nothing to delete: no error
    assert not files.path.exists()


def test_a_lock_file_deleted_while_waiting_for_its_flock_is_not_replaced(tmp_path, monkeypatch):
    files = lock._Files(tmp_path)
    assert files.create(b"old") == b"old"
    flock = lock.fcntl.flock

    def released_meanwhile(fd, op):  # the holder deletes its lock while we wait for the flock
        files.path.unlink()
        flock(fd, op)

    monkeypatch.setattr(lock.fcntl, "flock", released_meanwhile)
    assert files.replace(b"new", b"old") is None
    assert not files.path.exists()  # nothing written in its place


def test_a_lock_changed_since_it_was_read_is_not_replaced(tmp_path):
    files = lock._Files(tmp_path)
    files.create(b"theirs")
    assert files.replace(b"mine", b"what I read earlier") is None
    files.delete(b"what I read earlier")
    assert files.path.read_bytes() == b"theirs"


def test_an_out_that_is_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(lock.FlatDinoError, match="^--out 'run' is a file, not a folder; choose"):
        WriterLock(tmp_path / "run", "--out 'run'").acquire()


class Racing:
    """A lock backend where every create loses to another writer; `reads` are what each read
    finds afterwards (None: that writer let go in between)."""

    def __init__(self, reads: list):
        self.reads, self.creates = reads, 0

    def __str__(self) -> str:
        return "racing-lock"

    def create(self, data):
        self.creates += 1
        return None

    def read(self):
        return self.reads.pop(0) if self.reads else None

    def replace(self, data, version):
        return None

    def delete(self, version):
        raise AssertionError("a lock never taken is never deleted")


def test_a_writer_that_keeps_losing_the_race_gives_up_after_five_turns(tmp_path, monkeypatch):
    stale = foreign(renewed=0.0)  # a lease long run out: worth taking over, but replace loses
    backend = Racing([None, (stale, "v1"), None, (stale, "v2"), None])
    monkeypatch.setattr(WriterLock, "_open_backend", lambda self: backend)
    with pytest.raises(LockedError, match=r"^--out: other writers keep taking its lock \(racing"):
        WriterLock(tmp_path, "--out").acquire()
    assert backend.creates == 5 and backend.reads == []


class Renewals:
    """A lock backend that took the lock, then answers each renewal from `answers` (an exception
    is raised); the lock is lost once they run out."""

    def __init__(self, answers: list):
        self.answers, self.renewed = answers, []

    def __str__(self) -> str:
        return "renewed-lock"

    def create(self, data):
        return "v0"

    def replace(self, data, version):
        answer = self.answers.pop(0) if self.answers else None
        if isinstance(answer, Exception):
            raise answer
        if answer is not None:
            self.renewed.append(Holder.parse(data))
        return answer

    def delete(self, version):
        self.deleted = version


def test_renewal_retries_after_an_error_and_stops_when_the_lock_was_taken(
    tmp_path, monkeypatch, caplog
):
    backend = Renewals([OSError("network down"), "v1", None])
    monkeypatch.setattr(WriterLock, "_open_backend", lambda self: backend)
    held = WriterLock(tmp_path, "--out", lease_s=0.02)
    with caplog.at_level(logging.WARNING, "flatdino.lock"):
        held.acquire()
        held._renewer.join(timeout=10)  # ends by itself once the lock is lost
    assert not held._renewer.is_alive()
    assert "--out: could not renew the lock (network down); retrying" in caplog.text
    assert "--out: another writer took over this run's lock renewed-lock" in caplog.text
    assert held.version == "v1" and held.holder == backend.renewed[0]  # the one renewal kept
    held.release()
    assert backend.deleted == "v1"


def test_s3_lock_reads_none_when_absent_and_replaces_only_its_own_version(s3):
    objects = lock._Objects(Location(f"{s3}/f.zarr"))
    assert objects.read() is None
    assert objects.replace(b"x", '"not-an-etag"') is None  # absent: nothing to replace
    version = objects.create(b"mine")
    assert objects.replace(b"late", '"stale"') is None
    assert objects.read() == (b"mine", version)
    objects.delete('"stale"')  # not ours (any more): stays
    assert objects.read()[0] == b"mine"
    objects.delete(version)
    assert objects.read() is None


def test_a_lock_in_a_missing_bucket_says_the_bucket_does_not_exist(s3):
    url = f"{s3}-missing/f.zarr"
    with pytest.raises(lock.FlatDinoError, match=r"the bucket 'flatdino-\w+-missing' does not"):
        WriterLock(url, "--out").acquire()


def test_a_put_not_found_in_a_bucket_that_lists_is_raised_as_it_came(s3, monkeypatch):
    import obstore

    def not_found(*args, **kwargs):
        raise FileNotFoundError("Object at location .flatdino-lock not found")

    monkeypatch.setattr(obstore, "put", not_found)
    objects = lock._Objects(Location(f"{s3}/f.zarr"))
    with pytest.raises(FileNotFoundError, match="^Object at location .flatdino-lock not found$"):
        objects.create(b"mine")  # the bucket lists, so it is not a missing bucket
