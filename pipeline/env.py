"""Where code runs and what made it: the compute device, the inference precision and the installed
package version."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from importlib.metadata import PackageNotFoundError, version

import torch

from .errors import FlatDinoError


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when visible, else cpu; a CUDA device that is not there is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FlatDinoError(
            f"--device {device} but this worker sees no CUDA device; use --device auto or cpu "
            "(on Ray, give workers GPUs with --num-gpus-per-worker)"
        )
    return dev


def package_version() -> str:
    """The installed flatdino version, recorded in every store ("unknown" when not installed)."""
    try:
        return version("flatdino")
    except PackageNotFoundError:
        return "unknown"


PRECISIONS = ("auto", "bf16", "fp32")


def inference_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the networks at inference: `auto` is bf16 on CUDA and full fp32
    elsewhere; `fp32` is full fp32 everywhere (no autocast, no TF32). None means no autocast."""
    if precision not in PRECISIONS:
        raise FlatDinoError(
            f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}"
        )
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(dtype: torch.dtype | None, device: torch.device):
    """torch.autocast for `dtype` on `device`'s type, or a no-op context when dtype is None (also
    on device types autocast does not know, such as meta)."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@contextmanager
def fast_matmul(device: torch.device, precision: str = "auto") -> Iterator[None]:
    """TF32 for the fp32 matmuls left outside autocast, on CUDA, for the duration of a stage: only
    when the process still has PyTorch's default ("highest", which the user has not changed) and
    --precision is not fp32. The previous setting is restored afterwards."""
    before = torch.get_float32_matmul_precision()
    change = device.type == "cuda" and precision != "fp32" and before == "highest"
    if change:
        torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        if change:
            torch.set_float32_matmul_precision(before)
