"""One writer per run folder or store: a lock object inside it that names its holder.

`writer_lock(where, what)` holds `where/.flatdino-lock` (a local folder or an object-storage
prefix) for the duration of a block. The lock is a small JSON record: host, pid, the process's
start time, when the lock was taken, the command, a random token, and a lease (renewed, seconds).
A second writer is refused in one line naming the holder. A lock left behind is taken over with
a warning when its holder is gone:

- on this host: its pid no longer runs, or runs another process (pid reuse: the start times
  differ); the liveness of a process here is certain, so no lease needs to run out;
- on another host (a shared file system, an object store): its lease ran out. The holder renews
  the lease every `lease_s / 4` seconds on a daemon thread, so a crashed holder's lock expires
  within `lease_s` (hosts' clocks must agree to well within that).

Taking and taking over are compare-and-swap writes, so two writers racing for a stale lock
cannot both win: on object stores a conditional put (`mode="create"`: If-None-Match; the old
ETag: If-Match), on a local disk `os.link` of a complete file (fails if one exists) and an
`os.replace` made under `flock` of the file being replaced, after checking it is still the one
in place. The lock is released on a normal exit and on an exception; SIGKILL leaves it for the
next run to take over.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from .errors import FlatDinoError
from .storage import Location, explained

log = logging.getLogger("flatdino.lock")
LOCK_NAME = ".flatdino-lock"  # inside the run folder or the store; readers never list it
LEASE_S = 120.0  # a crashed holder on another host is taken over this long after its last renewal
HOST = socket.gethostname()


class LockedError(FlatDinoError):
    """Another live process writes the run folder or store."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock (the JSON record inside it)."""

    host: str
    pid: int
    proc_start: float  # the process's start time (psutil), to tell a reused pid apart
    started: str  # when the lock was taken, UTC
    command: str
    token: str  # this holding, unique
    renewed: float  # unix time of the last renewal
    lease_s: float

    @classmethod
    def me(cls, lease_s: float) -> Holder:
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"
        return cls(
            HOST,
            os.getpid(),
            psutil.Process().create_time(),
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            command[:200],
            uuid.uuid4().hex,
            time.time(),
            lease_s,
        )

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The record, or None for an unreadable one (a foreign or damaged file)."""
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.started} ({self.command})"

    def gone(self, now: float) -> str | None:
        """Why this holder no longer holds the lock, or None while it does."""
        if self.host == HOST:
            return None if process_runs(self.pid, self.proc_start) else "that process has ended"
        late = now - self.renewed - self.lease_s
        return f"its lease ran out {late:.0f} s ago" if late > 0 else None


def process_runs(pid: int, start: float) -> bool:
    """Whether process `pid` of this host runs and is the one that started at `start`."""
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - start) < 0.05 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:  # it exists and is someone else's: alive
        return True


class _Files:
    """The lock as a file of a local (or shared) folder; a version is the file's bytes."""

    def __init__(self, folder: Path):
        self.folder, self.path = folder, folder / LOCK_NAME

    def __str__(self) -> str:
        return str(self.path)

    def _staged(self, data: bytes) -> Path:
        tmp = self.folder / f"{LOCK_NAME}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, data: bytes) -> bytes | None:
        tmp = self._staged(data)
        try:
            os.link(tmp, self.path)  # atomic, and never over an existing lock
            return data
        except FileExistsError:
            return None
        finally:
            tmp.unlink()

    def read(self) -> tuple[bytes, bytes] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return data, data

    @contextmanager
    def _if_current(self, version: bytes) -> Iterator[bool]:
        """Under an exclusive flock of the lock file: whether it still holds `version`. The file
        is replaced by rename while locked, so a waiter then finds another file in place."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            yield False
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            yield same and self.path.read_bytes() == version
        finally:
            os.close(fd)  # releases the flock

    def replace(self, data: bytes, version: bytes) -> bytes | None:
        with self._if_current(version) as current:
            if not current:
                return None
            os.replace(self._staged(data), self.path)
            return data

    def delete(self, version: bytes) -> None:
        with self._if_current(version) as current:
            if current:
                self.path.unlink()


class _Objects:
    """The lock as one object under a store's prefix; a version is its ETag."""

    def __init__(self, location: Location):
        self.location, self.url = location, location.url
        self.store = location.store.store  # the obstore store under zarr's ObjectStore

    def __str__(self) -> str:
        return f"{self.url.rstrip('/')}/{LOCK_NAME}"

    def create(self, data: bytes) -> str | None:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        with explained(self.url):
            try:
                return obstore.put(self.store, LOCK_NAME, data, mode="create")["e_tag"]
            except (AlreadyExistsError, PreconditionError):
                return None
            except FileNotFoundError:  # no bucket: a listing says so in one line (StorageError)
                self.location.keys()
                raise

    def read(self) -> tuple[bytes, str] | None:
        import obstore
        from obstore.exceptions import NotFoundError

        with explained(self.url):
            try:
                got = obstore.get(self.store, LOCK_NAME)
            except (NotFoundError, FileNotFoundError):
                return None
            return bytes(got.bytes()), got.meta["e_tag"]

    def replace(self, data: bytes, version: str) -> str | None:
        import obstore
        from obstore.exceptions import NotFoundError, PreconditionError

        with explained(self.url):
            try:
                return obstore.put(self.store, LOCK_NAME, data, mode={"e_tag": version})["e_tag"]
            except (PreconditionError, NotFoundError, FileNotFoundError):
                return None

    def delete(self, version: str) -> None:
        import obstore

        found = self.read()  # an object store has no conditional delete: check, then delete
        if found is not None and found[1] == version:
            with explained(self.url):
                obstore.delete(self.store, LOCK_NAME)


class WriterLock:
    """The lock of one folder or prefix, held by this process between `acquire` and `release`."""

    def __init__(self, where: str | os.PathLike, what: str, lease_s: float = LEASE_S):
        self.location = Location(str(where))
        self.what = what  # in messages: "--out 'runs/dit'"
        self.lease_s = lease_s
        self.backend: _Files | _Objects | None = None
        self.created_folder = False
        self.holder: Holder | None = None
        self.version: bytes | str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _open_backend(self) -> _Files | _Objects:
        if self.location.remote:
            return _Objects(self.location)
        folder = self.location.path
        if folder.exists() and not folder.is_dir():
            raise FlatDinoError(f"{self.what} is a file, not a folder; choose another --out")
        self.created_folder = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        return _Files(folder)

    def acquire(self) -> None:
        """Take the lock, take over a dead holder's (a warning), or refuse a live one's."""
        self.backend = backend = self._open_backend()
        self.holder = Holder.me(self.lease_s)
        data = self.holder.to_bytes()
        for _ in range(5):  # each turn loses only to another writer that just took or let go
            self.version = backend.create(data)
            if self.version is not None:
                break
            found = backend.read()
            if found is None:
                continue  # released in between
            old, version = Holder.parse(found[0]), found[1]
            why = "it is unreadable" if old is None else old.gone(time.time())
            if why is None:
                self._forget_folder()
                raise LockedError(
                    f"{self.what} is being written by {old.describe()}; wait for it to end or "
                    f"stop it (a lock whose writer died is taken over; lock: {backend})"
                )
            self.version = backend.replace(data, version)
            if self.version is not None:
                who = "an unreadable lock" if old is None else f"the lock of {old.describe()}"
                log.warning("%s: taking over %s: %s", self.what, who, why)
                break
        else:
            raise LockedError(f"{self.what}: other writers keep taking its lock ({backend}); retry")
        self._renewer = threading.Thread(target=self._renew, name="flatdino-lock", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        """Every lease/4 seconds, move the lease on; stop when the lock was taken from us."""
        while not self._stop.wait(self.lease_s / 4):
            renewed = Holder(**{**asdict(self.holder), "renewed": time.time()})
            try:
                version = self.backend.replace(renewed.to_bytes(), self.version)
            except Exception as error:  # a network hiccup: the lease has time left; try again
                log.warning("%s: could not renew the lock (%s); retrying", self.what, error)
                continue
            if version is None:
                log.error(
                    "%s: another writer took over this run's lock %s", self.what, self.backend
                )
                return
            self.holder, self.version = renewed, version

    def release(self) -> None:
        """Stop renewing and delete the lock if it is still ours (and a folder made for it)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.backend is not None and self.version is not None:
            self.backend.delete(self.version)
        self._forget_folder()

    def _forget_folder(self) -> None:
        """Remove the local folder that acquire made when nothing else was written into it."""
        if self.created_folder:
            with suppress(OSError):  # not empty: the run or store is there now
                self.location.path.rmdir()


@contextmanager
def writer_lock(
    where: str | os.PathLike, what: str, enabled: bool = True, lease_s: float = LEASE_S
) -> Iterator[WriterLock | None]:
    """Hold the lock of `where` for the block (`enabled=False`: a no-op, e.g. on ranks > 0)."""
    if not enabled:
        yield None
        return
    lock = WriterLock(where, what, lease_s)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
