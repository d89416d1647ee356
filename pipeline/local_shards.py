"""Chosen rows of a sharded Zarr array on local disk, read straight from its shard files.

zarr-python spends ~250 us of CPU on each inner chunk it reads from a shard (a thread hand-off,
a file open, a new buffer, a decode, a copy; measured on 393 KB chunks: 1.2-1.6 GB/s, and half
that for the loader's runs of ~2 chunks), about ten times what copying the bytes costs. For the
one layout a feature store is written in (zarr v3 `sharding_indexed`, inner codec `bytes` only,
index `bytes` + `crc32c` at the shard's end; the zarr v3 sharding spec), `LocalShards` reads a
shard's index once, checks its checksum, and reads each row with one `pread` into the caller's
array. Any other array (object storage, compression, another layout) gets None from `of`, and
its reader uses zarr.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import google_crc32c  # zarr's own crc32c codec uses it
import numpy as np
import zarr

from .errors import FlatDinoError

MISSING = 2**64 - 1  # an index entry of a chunk never written (the spec's empty chunk)
LITTLE = {"name": "bytes", "configuration": {"endian": "little"}}
CHECKSUM = {"name": "crc32c"}


class LocalShards:
    """Rows [i, v] of one (N, V, ...) sharded array in directory `where` (its zarr.json's)."""

    def __init__(self, array: zarr.Array, where: Path, fix: str):
        self.where, self.fix = where, fix
        self.dtype, self.fill = array.dtype, array.fill_value
        self.shard_rows = int(array.shards[0])
        self.chunk_rows = int(array.chunks[0])
        self.row_shape = tuple(array.shape[2:])
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.grid = (self.shard_rows // self.chunk_rows, int(array.shape[1]))  # chunks per shard
        self.encode = array.metadata.encode_chunk_key

    @classmethod
    def of(cls, array: zarr.Array, where: Path | None, fix: str) -> LocalShards | None:
        """The reader of `array` stored in local directory `where` (None: not local), or None
        when its layout is not the one this module reads."""
        meta = array.metadata
        if where is None or meta.zarr_format != 3 or array.shards is None:
            return None
        (codec,) = meta.to_dict()["codecs"] if len(meta.codecs) == 1 else (None,)
        config = codec["configuration"] if codec and codec["name"] == "sharding_indexed" else {}
        one_byte = array.dtype.itemsize == 1  # `bytes` of one-byte values has no byte order
        inner = [[LITTLE], [{"name": "bytes"}]] if one_byte else [[LITTLE]]
        layout = (
            list(config.get("codecs", ())) in inner
            and list(config.get("index_codecs", ())) == [LITTLE, CHECKSUM]
            and config.get("index_location") == "end"
            and array.chunks[1:] == (1, *array.shape[2:])  # one view of whole rows per chunk
            and array.shards[1:] == array.shape[1:]
        )
        native = one_byte or array.dtype.byteorder in "=<" and sys.byteorder == "little"
        return cls(array, where, fix) if layout and native else None

    def read(self, rows: np.ndarray, views: np.ndarray, into: list[np.ndarray]) -> None:
        """array[rows[k], views[k]] into the C-contiguous array into[k] for every k; `rows`
        inside one shard."""
        shard = int(rows[0]) // self.shard_rows
        path = self.where / self.encode((shard, *(0,) * (1 + len(self.row_shape))))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a shard never written holds the fill value
            for target in into:
                target[...] = self.fill
            return
        try:
            index = self._index(fd, path)
            local = np.asarray(rows) - shard * self.shard_rows
            entries = index[local // self.chunk_rows, np.asarray(views)]  # (m, 2)
            starts = entries[:, 0] + (local % self.chunk_rows).astype(np.uint64) * self.row_bytes
            for target, start, (offset, length) in zip(
                into, starts.tolist(), entries.tolist(), strict=True
            ):
                assert target.flags.c_contiguous  # else reshape would read into a copy
                if offset == MISSING:
                    target[...] = self.fill
                elif length != self.chunk_rows * self.row_bytes or (
                    os.preadv(fd, [target.reshape(-1).view(np.uint8)], start) != self.row_bytes
                ):
                    self._damaged(path, f"a chunk of {length} bytes at {offset}")
        finally:
            os.close(fd)

    def _index(self, fd: int, path: Path) -> np.ndarray:
        """The shard's (chunks, views, 2) offsets and lengths, its checksum checked."""
        size = int(np.prod(self.grid)) * 16 + 4
        end = os.fstat(fd).st_size
        raw = os.pread(fd, size, end - size) if end >= size else b""
        if len(raw) != size or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            self._damaged(path, "its index (the last bytes) does not match its checksum")
        return np.frombuffer(raw[:-4], "<u8").reshape(*self.grid, 2)

    def _damaged(self, path: Path, what: str) -> None:
        raise FlatDinoError(f"{str(path)!r} is damaged: {what}; {self.fix}")
