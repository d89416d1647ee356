"""The crash-safe, resumable output folder of `flatdino sample`.

Each finished batch is written to a work folder beside --out, named by the run's key (its PNGs,
encoded in a thread pool while the next batch runs, then one .npz of its arrays, by rename), so
an interrupted run, rerun with the same command, continues from the batches already written.
When all are done, rank 0 assembles samples.npz, latents.npy and features.npy batch by batch
(memory stays flat for a 50K-sample FID run), draws grid.png and swaps the folder in as --out: no
half-written or stale outputs. The disk's free space is checked first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageDraw

from ..pipeline.errors import FlatDinoError

log = logging.getLogger(__name__)


def batches_of(n: int, batch_size: int) -> list[range]:
    """The fixed batches of a run: batch b holds samples b·B .. min(b·B + B, n) - 1."""
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


class NpyWriter:
    """An .npy file written front to back into `file`, batch by batch, its header stating the
    final shape. Plain sequential writes, not a memory map: a full disk raises OSError (ENOSPC)
    where a written memory map would kill the process with SIGBUS."""

    def __init__(self, file: BinaryIO, dtype: np.dtype, shape: tuple[int, ...]):
        self.file = file
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
            "fortran_order": False,
            "shape": tuple(shape),
        }
        np.lib.format.write_array_header_2_0(file, header)

    def write(self, rows: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(rows).tobytes())


def bytes_needed(left: int, total: int, dit, vae, decoder, keep_features: bool) -> int:
    """At most how many bytes a run writes beside --out: the batch files and PNGs of the `left`
    samples still to generate, plus the assembled arrays of all `total`."""
    arrays = 0  # per sample, in a batch file and again in the assembled outputs
    if keep_features:  # latents float32, features float16, a CLS token float32
        arrays += dit.cfg.tokens * dit.cfg.latent_dim * 4 + vae.cfg.num_patches * vae.cfg.in_dim * 2
        arrays += dit.cfg.cls_dim * 4
    pixels = decoder.cfg.image_size**2 * decoder.cfg.channels if decoder is not None else 0
    return left * (arrays + 2 * pixels) + total * (arrays + pixels)  # PNGs at most the raw size


def check_free_space(folder: Path, needed: int, out: str) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise FlatDinoError(
            f"sampling needs up to {needed / 2**30:.2f} GiB beside --out {out!r} but only "
            f"{free / 2**30:.2f} GiB is free there; free some space, sample fewer (--n / "
            "--per-class), or choose an --out on a larger disk"
        )


class BatchWriter:
    """Writes finished batches off the main thread: each batch's PNGs in parallel on `threads`
    threads, then its arrays as `batches/BBBBBB.npz` (by rename: the file exists only once the
    whole batch, PNGs included, is on disk). At most `ahead` batches wait, so memory stays flat;
    an error in a writer is raised in the main thread at the next batch."""

    def __init__(self, work: Path, threads: int, ahead: int = 2):
        self.work, self.ahead = work, ahead
        self.pngs = ThreadPoolExecutor(max(1, threads), thread_name_prefix="png")
        self.finish = ThreadPoolExecutor(1, thread_name_prefix="batch")
        self.pending: deque[Future] = deque()

    def submit(
        self, b: int, rows: range, labels: np.ndarray, arrays: dict[str, np.ndarray]
    ) -> None:
        while len(self.pending) >= self.ahead:
            self.pending.popleft().result()
        pngs = []
        if "pixels" in arrays:
            for k, image in zip(rows, arrays["pixels"], strict=True):
                path = self.work / "images" / f"{k:05d}_c{labels[k]}.png"
                pngs.append(self.pngs.submit(save_png, image, path))
        self.pending.append(self.finish.submit(self._finish, b, pngs, arrays))

    def _finish(self, b: int, pngs: list[Future], arrays: dict[str, np.ndarray]) -> None:
        for f in pngs:
            f.result()
        final = batch_file(self.work, b)
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())  # on disk before its name says the batch is done
        os.replace(tmp, final)

    def close(self) -> None:
        """Wait for every batch (raising a writer's error) and stop the threads."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pngs.shutdown(cancel_futures=True)
            self.finish.shutdown(cancel_futures=True)


def save_png(image: np.ndarray, path: Path) -> None:
    """zlib level 1: about 3x faster than PIL's default 6 on natural images, files ~7% larger
    (the FID evaluators read samples.npz; the PNGs are for people and other tools)."""
    Image.fromarray(image).save(path, compress_level=1)


def batch_file(work: Path, b: int) -> Path:
    return work / "batches" / f"{b:06d}.npz"


def assemble(work: Path, labels: np.ndarray, batch_size: int, shown: frozenset[int]) -> dict:
    """Rank 0, once every batch is written: samples.npz (arr_0 + labels), latents.npy,
    features.npy (and cls.npy) in `work`, appended batch by batch in sample order. Returns the
    images numbered in `shown` (the ones grid.png shows)."""
    kept: dict[int, np.ndarray] = {}
    names = {"pixels": "samples.npz", "latents": "latents.npy", "features": "features.npy"}
    names |= {"cls": "cls.npy"}  # a CLS generator's
    with ExitStack() as files:
        writers: dict[str, NpyWriter] = {}
        for b, rows in enumerate(batches_of(len(labels), batch_size)):
            path = batch_file(work, b)
            try:  # every member read whole here: a damaged one fails its CRC check now
                with np.load(path) as batch:
                    arrays = {name: batch[name] for name in batch.files}
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                path.unlink(missing_ok=True)
                raise FlatDinoError(
                    f"batch file {str(path)!r} was damaged ({e}) and is removed; rerun the same "
                    "command to generate that batch again"
                ) from e
            for name, value in arrays.items():
                if name not in writers:
                    writers[name] = _open_array(files, work / names[name], name, value, labels)
                writers[name].write(value)
                if name == "pixels":  # copies: a view would keep the whole batch alive
                    kept.update((k, value[j].copy()) for j, k in enumerate(rows) if k in shown)
    return kept


def _open_array(
    files: ExitStack, path: Path, name: str, first: np.ndarray, labels: np.ndarray
) -> NpyWriter:
    """An NpyWriter for all N rows of `name`: into a plain .npy, or, for pixels, into arr_0.npy of
    samples.npz (an uncompressed zip, the layout the ADM evaluator reads) beside labels.npy."""
    if name == "pixels":
        npz = files.enter_context(zipfile.ZipFile(path, "w"))
        with npz.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, labels)
        file = files.enter_context(npz.open("arr_0.npy", "w", force_zip64=True))
    else:
        file = files.enter_context(open(path, "wb"))  # noqa: SIM115  # closed by the ExitStack
    return NpyWriter(file, first.dtype, (len(labels), *first.shape[1:]))


def grid_indices(labels: np.ndarray, by_class: bool, per_row: int = 16, rows: int = 32) -> list:
    """The samples grid.png shows: the first `rows` classes with up to `per_row` samples each, or
    the first 64 samples in near-square rows; a 50K-sample run still gets a small grid."""
    if by_class:
        classes = list(dict.fromkeys(labels.tolist()))[:rows]
        return [np.flatnonzero(labels == c)[:per_row] for c in classes]
    n = min(len(labels), 64)
    cols = int(np.ceil(np.sqrt(n)))
    return [np.arange(i, min(i + cols, n)) for i in range(0, n, cols)]


def make_grid(
    images, labels: np.ndarray, rows: list, names: list[str] | None, by_class: bool
) -> Image.Image:
    """The chosen samples in rows (`images[i]`: sample i, H x W x 3); each class row labelled on
    the left when `by_class`."""
    h, w = np.asarray(images[rows[0][0]]).shape[:2]
    margin = 64 if by_class else 0
    grid = Image.new("RGB", (margin + max(len(r) for r in rows) * w, len(rows) * h), "white")
    draw = ImageDraw.Draw(grid)
    for r, idx in enumerate(rows):
        if by_class:
            c = int(labels[idx[0]])
            draw.text((4, r * h + h // 2 - 6), names[c] if names else str(c), fill=(0, 0, 0))
        for k, i in enumerate(idx):
            grid.paste(Image.fromarray(np.asarray(images[i])), (margin + k * w, r * h))
    return grid


def check_out(out: Path, marker: str = "sample.json", what: str = "a sample run") -> None:
    """--out is a folder that is empty, absent or a previous run, `what`, recognised by its
    `marker` file (never the user's files)."""
    if out.exists() and not out.is_dir():
        raise FlatDinoError(f"--out {str(out)!r} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).exists():
        raise FlatDinoError(
            f"--out {str(out)!r} holds files that are not {what}; choose another --out"
        )


def identity(path: Path) -> list:
    """A checkpoint's identity: its resolved path and its files' names, sizes and mtimes (a
    checkpoint saved again into the same folder is another model)."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [str(path.resolve()), *[(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]]


def stale_work(out: Path, key: str) -> list[Path]:
    """Work folders beside --out of other configs (and older versions' temporary folders)."""
    work = work_folder(out, key)
    found = [*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.tmp-*")]
    return [p for p in found if p != work]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def work_folder(out: Path, key: str) -> Path:
    return out.parent / f".{out.name}.partial-{key}"


def _batch_ok(path: Path, names: set[str]) -> bool:
    """Whether a batch file is whole: a readable zip holding exactly the arrays of this run."""
    try:
        with zipfile.ZipFile(path) as z:
            return {Path(n).stem for n in z.namelist()} == names
    except (OSError, zipfile.BadZipFile):
        return False


def open_work(out: Path, key: str, names: set[str]) -> tuple[Path, set[int]]:
    """The work folder of this config beside --out, kept from an interrupted run or made new, and
    the numbers of its whole batch files; other configs' work folders are removed (with a
    warning), and so are a batch file a killed run left half-written."""
    work = work_folder(out, key)
    for stale in stale_work(out, key):
        batches = len(list((stale / "batches").glob("*.npz")))
        log.warning(
            "removing %s (%d batch files): an unfinished sample run with another config",
            stale,
            batches,
        )
        shutil.rmtree(stale, ignore_errors=True)
    (work / "images").mkdir(parents=True, exist_ok=True)
    (work / "batches").mkdir(exist_ok=True)
    for tmp in (work / "batches").glob("*.tmp"):  # a batch a killed run was writing
        tmp.unlink()
    done = set()
    for path in sorted((work / "batches").glob("*.npz")):
        if _batch_ok(path, names):
            done.add(int(path.stem))
        else:
            log.warning("%s is damaged; its batch is generated again", path)
            path.unlink()
    return work, done


def swap_in(tmp: Path, out: Path) -> None:
    """Replace --out (a previous sample run, if any) by the finished folder: no stale files."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def previous(out: Path, key: str) -> dict | None:
    """The record of a finished run of this very config in --out, if that is what is there."""
    try:
        record = json.loads((out / "sample.json").read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("key") == key else None
