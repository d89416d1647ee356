"""Where code runs and what made it: the compute device and the installed package version."""

from __future__ import annotations

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
