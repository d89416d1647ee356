"""The latents store: FlatDINO latents (mu, optional logvar) of a feature store, in Zarr v3.

Layout (FORMAT_VERSION 1), N images, V views, T tokens, d dims:

    STORE/zarr.json   attrs: kind, fingerprint (VAE sha256 + config, features store identity, dtype),
                      shard_size, class_names, complete, created, package_version
    STORE/mu          float32 | float16 (N, V, T, d), one chunk per shard
    STORE/logvar      same shape (with --save-logvar)
    STORE/cls         float16 (N, V, C), one chunk per shard: each view's DINOv2 CLS token, copied
                      from a feature store of format 4 (absent for older ones); not normalised
    STORE/labels      int32 (N,);  STORE/valid  bool (N,) (copied from the feature store)
    STORE/done        bool (shards,)
    STORE/mu_mean, STORE/mu_std   float32 (T, d): statistics of mu over valid rows and all views

STORE is a local directory or an object-storage prefix (`pipeline.storage`). Shards, done markers, creation and resume are `pipeline.store`'s.
`cls` is optional as `logvar` is (no new format number): a store without it is read as before, and
`require_cls` is the one refusal for a run that needs it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import zarr
from tqdm import tqdm

from .errors import InputError
from .feature_store import FeatureStore
from .storage import Location, explained
from .store import Shard, ShardedStore, row_block, utc_now

FORMAT_VERSION = 1
KIND = "flatdino.latents"


class LatentStore(ShardedStore):
    """Read and write access to one latents store directory."""

    KIND = KIND
    FORMAT_VERSION = FORMAT_VERSION
    NAME = "flatdino latents store"
    MAKER = "encode-latents"
    ROWS = "mu"
    ARRAYS = ("mu", "logvar", "cls", "labels", "valid", "done", "mu_mean", "mu_std")

    @property
    def mu(self) -> zarr.Array:
        return self.array("mu")

    @property
    def token_shape(self) -> tuple[int, int]:
        """(T, d) of one latent."""
        _, _, t, d = self.mu.shape
        return int(t), int(d)

    @property
    def has_cls(self) -> bool:
        """Whether the store holds each view's DINOv2 CLS token (from a format-4 feature store)."""
        return self.has("cls")

    def require_cls(self, option: str = "--latents") -> None:
        """The one refusal of a run that needs the CLS token (train-dit --cls) on a store without
        it: one line naming the store and what to re-run."""
        if not self.has_cls:
            raise InputError(
                f"{option} {self.path!r} holds no DINOv2 CLS token (its features store was "
                "written before format 4 or with --no-cls); re-run `flatdino extract-features` "
                "(it keeps the token by default) and `flatdino encode-latents` on its output"
            )

    def train_views(self, views: int | None) -> int:
        """How many stored views to train on: `views` (checked), or all of them for None."""
        stored = self.num_views
        if views is not None and not 1 <= views <= stored:
            raise InputError(
                f"--views must be 1..{stored} (the views in {str(self.path)!r}); got {views}"
            )
        return stored if views is None else views

    def read_rows(
        self, rows: np.ndarray, views: int, progress: bool = False, name: str = "mu"
    ) -> tuple[np.ndarray, int]:
        """(array[rows, :views] (n, views, ...), bytes read) of the array `name` (mu (n, V, T, d),
        or cls (n, V, C)) for sorted `rows`, reading only the chunks that hold them, each whole
        and once."""
        mu = self.array(name)
        out = np.empty((len(rows), views, *mu.shape[2:]), dtype=mu.dtype)  # (n, V, ...)
        block, at, read = row_block(mu), 0, 0
        first, last = (rows[0] // block, rows[-1] // block + 1) if len(rows) else (0, 0)
        for lo in tqdm(
            range(first * block, last * block, block),
            desc=f"load {name}",
            unit="chunk",
            disable=not progress,
        ):
            mine = rows[(rows >= lo) & (rows < lo + block)]
            if len(mine):
                chunk = mu[lo : lo + block]  # whole chunk
                read += chunk.nbytes
                out[at : at + len(mine)] = chunk[mine - lo, :views]
                at += len(mine)
        return out, read

    def num_classes(self) -> int:
        """From the class names when recorded, else from the largest label."""
        names = self.class_names
        return len(names) if names else int(self.array("labels")[:].max()) + 1

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu_mean, mu_std), each (T, d) float32: the normalisation train-dit may apply."""
        return self.array("mu_mean")[:], self.array("mu_std")[:]

    def write_shard(
        self,
        shard: Shard,
        mu: np.ndarray,
        logvar: np.ndarray | None,
        cls: np.ndarray | None = None,
    ) -> None:
        """Write one shard's latents (logvar, CLS tokens (n, V, C) when the store keeps them),
        then mark it done."""
        dtype = self.mu.dtype
        assert (cls is not None) == self.has_cls, "CLS tokens given iff the store keeps them"
        with explained(self.path):  # a failing object store: one line, from any worker
            self.array("mu")[shard.start : shard.stop] = mu.astype(dtype)
            if logvar is not None and self.has("logvar"):
                self.array("logvar")[shard.start : shard.stop] = logvar.astype(dtype)
            if cls is not None:
                self.array("cls")[shard.start : shard.stop] = cls.astype(np.float16)
            self.array("done")[shard.index] = True  # last: the shard is complete

    def finalize(self) -> None:
        """Per-(token, dim) mean and std of mu over valid rows and all views (float64 sums)."""
        valid = self.valid_mask()
        total, total_sq, count = 0.0, 0.0, 0
        for s in self.shards():
            block = self.mu[s.start : s.stop][valid[s.start : s.stop]].astype(np.float64)
            total = total + block.sum((0, 1))  # block: (k, V, T, d)
            total_sq = total_sq + (block**2).sum((0, 1))
            count += block.shape[0] * block.shape[1]
        mean = total / max(count, 1)
        std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean**2, 0.0))
        t, d = self.token_shape
        for name, value in (("mu_mean", mean), ("mu_std", std)):
            self.group.create_array(name, shape=(t, d), dtype="float32", overwrite=True)
            self.array(name)[:] = np.broadcast_to(value, (t, d)).astype(np.float32)
        self.mark_complete()

    @staticmethod
    def layout(
        features: FeatureStore, tokens: int, dim: int, dtype: str, save_logvar: bool, attrs: dict
    ) -> Callable[[zarr.Group, Location], None]:
        """The `build` of an empty store with the rows, shards and labels of `features`."""

        def build(group: zarr.Group, location: Location) -> None:
            n, v = features.features.shape[:2]
            size = features.shard_size
            for name in ("mu", "logvar") if save_logvar else ("mu",):
                group.create_array(
                    name,
                    shape=(n, v, tokens, dim),
                    chunks=(size, v, tokens, dim),
                    dtype=dtype,
                    fill_value=0,
                )
            if features.has_cls:  # as stored: float16, not normalised (DESIGN.md)
                c = features.array("cls").shape[2]
                group.create_array(
                    "cls", shape=(n, v, c), chunks=(size, v, c), dtype="float16", fill_value=0
                )
            group.create_array("labels", shape=(n,), chunks=(max(1, n),), dtype="int32")
            group.create_array("valid", shape=(n,), chunks=(max(1, n),), dtype="bool")
            group.create_array(
                "done", shape=(len(features.shards()),), chunks=(1,), dtype="bool", fill_value=False
            )
            group["labels"][:] = features.group["labels"][:]
            group["valid"][:] = features.group["valid"][:]
            group.attrs.update(
                {
                    "kind": KIND,
                    "format_version": FORMAT_VERSION,
                    "shard_size": size,
                    "features_store": features.location.identity(),
                    "class_names": features.class_names,
                    "complete": False,
                    "created": utc_now(),
                    **attrs,
                }
            )

        return build
