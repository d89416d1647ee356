"""Where a store lives: a local directory or an object-storage prefix (s3://, gs://, az://).

Every byte of a store (arrays, zarr.json attrs, the manifest, per-shard errors) goes through one
Zarr v3 store object: `zarr.storage.LocalStore` for a path, `zarr.storage.ObjectStore` over
obstore for a URL. obstore is one Rust wheel that speaks S3, GCS and Azure with their usual
environment variables (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS,
AZURE_STORAGE_ACCOUNT_NAME, ...); it has no aiobotocore/botocore version pins to fight torch and
Ray over, and its store objects pickle, so Ray actors and DataLoader workers open the same
location. It is the `flatdino[cloud]` extra.

Object stores have no rename: a store's life is puts of whole objects (each atomic), ordered so
that a reader never mistakes a half-done step for a finished one (`pipeline.store`). Errors of the
object store (no bucket, bad credentials, unreachable endpoint) become one-line `StorageError`s.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.common import concurrent_map
from zarr.core.sync import collect_aiterator, sync

from .errors import FlatDinoError, MetadataError, json_object

# The fix for a store whose metadata is damaged: we cannot tell whether it is ours, so flatdino
# never deletes it (not even with --overwrite).
DAMAGED = "restore the file, or delete the store yourself and build it again"

# URL schemes obstore's `from_url` understands, and the cloud each belongs to (for messages)
SCHEMES = {
    "s3": "S3",
    "s3a": "S3",
    "gs": "GCS",
    "az": "Azure",
    "abfs": "Azure",
    "abfss": "Azure",
    "azure": "Azure",
}
CREDENTIALS = {
    "S3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a non-AWS endpoint)",
    "GCS": "GOOGLE_APPLICATION_CREDENTIALS (a service-account JSON file)",
    "Azure": "AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY",
}
EXTRA = "pip install 'flatdino[cloud]'"


class StorageError(FlatDinoError):
    """The object store refused or could not be reached (one line: what, where, how to fix)."""


def scheme_of(path: str | os.PathLike) -> str | None:
    """'s3' for 's3://bucket/x'; None for a local path (also 'file://...')."""
    text = str(path)
    if "://" not in text:
        return None
    scheme = text.split("://", 1)[0].lower()
    return None if scheme == "file" else scheme


def is_url(path: str | os.PathLike) -> bool:
    return scheme_of(path) is not None


@dataclass(frozen=True)
class Location:
    """A store's root: `url` is what the user gave (a path or a URL). Cheap, picklable."""

    url: str

    def __post_init__(self):
        scheme = scheme_of(self.url)
        if scheme is not None and scheme not in SCHEMES:
            raise StorageError(
                f"{self.url!r}: unsupported URL scheme {scheme!r}; use a local path or one of "
                + ", ".join(f"{s}://" for s in ("s3", "gs", "az"))
            )

    @property
    def remote(self) -> bool:
        return is_url(self.url)

    @property
    def path(self) -> Path:
        """The local directory (local locations only)."""
        assert not self.remote, self.url
        return Path(self.url.removeprefix("file://"))

    def identity(self) -> str:
        """What a store records about another store: the absolute path, or the URL."""
        return self.url.rstrip("/") if self.remote else str(self.path.resolve())

    @cached_property
    def store(self) -> zarr.abc.store.Store:
        """The Zarr store object rooted at this location (read-write)."""
        if not self.remote:
            return zarr.storage.LocalStore(self.path)
        try:
            from obstore.store import from_url
        except ImportError:
            raise StorageError(
                f"{self.url!r} needs the object-storage library obstore, which is not installed; "
                f"{EXTRA}"
            ) from None
        with explained(self.url):
            return zarr.storage.ObjectStore(from_url(self.url))

    def __getstate__(self) -> dict:
        return {"url": self.url}  # the store object is rebuilt where it is unpickled

    def __setstate__(self, state: dict) -> None:
        object.__setattr__(self, "url", state["url"])

    def open_group(self, mode: str = "r") -> zarr.Group:
        store = self.store.with_read_only(mode == "r")
        with explained(self.url):
            return zarr.open_group(store, mode=mode)

    def read(self, key: str) -> bytes | None:
        """The object `key` under this location, None if absent."""
        with explained(self.url):
            buf = sync(self.store.get(key, default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    def write(self, key: str, data: bytes) -> None:
        """Put one whole object (atomic on object stores; tmp + rename on local disks)."""
        with explained(self.url):
            sync(self.store.set(key, default_buffer_prototype().buffer.from_bytes(data)))

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix` (relative to this location), sorted."""
        if not self.remote and not self.path.is_dir():
            return []
        with explained(self.url):
            return sorted(collect_aiterator(self.store.list_prefix(prefix)))

    def attrs(
        self, expected: str = "a flatdino store's zarr.json", fix: str = DAMAGED
    ) -> dict | None:
        """The root zarr.json's attributes; None when there is no zarr.json here. One that is
        empty, truncated or an array's (not a group's) is a MetadataError naming `expected`."""
        if not self.remote and not self.path.is_dir():
            return None
        raw = self.read("zarr.json")
        if raw is None:
            if self.remote:
                self.keys()  # a missing bucket reads as a missing object; a listing says which
            return None
        where = f"{self.url.rstrip('/')}/zarr.json"
        meta = json_object(raw, where, expected, fix)
        if meta.get("node_type") != "group":
            kind = meta.get("node_type")
            found = "is a Zarr array's metadata" if kind == "array" else f"has node_type {kind!r}"
            raise MetadataError(f"{where!r} {found}, not {expected}; {fix}")
        return meta.get("attributes", {})

    def delete_all(self, keep: str | None = None) -> None:
        """Delete everything under this location (callers check first that it is ours) but the
        keys that start with `keep` (the writer's lock)."""
        if keep is None:
            with explained(self.url):
                sync(self.store.delete_dir(""))
        elif not self.remote:
            for entry in self.path.iterdir() if self.path.is_dir() else ():
                if not entry.name.startswith(keep):
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        else:
            doomed = [(key,) for key in self.keys() if not key.startswith(keep)]
            limit = zarr.config.get("async.concurrency")
            with explained(self.url):
                sync(concurrent_map(doomed, self.store.delete, limit=limit))


def open_group(path: str | os.PathLike, mode: str = "r") -> zarr.Group:
    """The Zarr group at a local path or URL."""
    return Location(str(path)).open_group(mode)


class explained:
    """Turn the object store's errors inside the block into one-line StorageErrors for `url`."""

    def __init__(self, url: str):
        self.url = url

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or isinstance(error, FlatDinoError):
            return False
        message = describe(self.url, error)
        if message is None:
            return False
        raise StorageError(message) from None


def describe(url: str, error: BaseException) -> str | None:
    """One line for an object-store error at `url`, or None when `error` is not one of them."""
    if not type(error).__module__.startswith("obstore"):
        return None
    text = str(error)
    cloud = SCHEMES.get(scheme_of(url) or "", "the object store")
    creds = CREDENTIALS.get(cloud, "the credential environment variables")
    endpoint = os.environ.get("AWS_ENDPOINT_URL") if cloud == "S3" else None
    where = f" at {endpoint}" if endpoint else ""
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if "NoSuchBucket" in text or "ContainerNotFound" in text or "bucket does not exist" in text:
        return f"{url!r}: the bucket {bucket!r} does not exist{where}; create it or fix the URL"
    if "169.254.169.254" in text or "credential" in text.lower():  # fell through to the metadata
        return f"{url!r}: no {cloud} credentials found; set {creds}"  # service of a cloud VM
    if any(
        k in text
        for k in (
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "Forbidden",
            "AuthenticationFailed",
            "403",
        )
    ):
        return f"{url!r}: the {cloud} credentials were refused{where}; check {creds}"
    if "error sending request" in text or "Connection refused" in text or "dns" in text.lower():
        shown = endpoint or f"the {cloud} endpoint"
        return (
            f"{url!r}: cannot reach {shown} (connection failed after retries); check the "
            f"endpoint{' (AWS_ENDPOINT_URL)' if cloud == 'S3' else ''} and the network"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return f"{url!r}: {cloud} error: {first[:300]}"
