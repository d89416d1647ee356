"""8-bit features: int8 codes with one scale per patch vector, and the one way back to float.

A patch vector x (C,) is stored as codes q = round(x / s) in [-127, 127] (int8) and its scale
s = max|x| / 127 (float16, `SCALE_DTYPE`): symmetric absmax quantisation per (row, view, patch).
The codes are computed with the float16-rounded scale, so storing the scale in 16 bits adds no
error; the error of an element is at most s / 2, i.e. about 1/254 of the vector's largest
|element| (docs/benchmarks.md, "Features in 8 bits", measures it on real photos). This holds for
scales in float16's normal range, max|x| >= 7.8e-3: the backbone's final LayerNorm (no affine)
gives every patch vector unit RMS, so max|x| is between 1 and sqrt(C).

Features travel as a *stored batch*: a float16 array or tensor (float16 stores), or the pair
(codes (..., C) int8, scales (...) float16) of an int8 store. `dequantise` is the one place a pair
becomes floats; the trainers call `to_device`, which copies the stored bytes (half of float16's)
and multiplies on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .configs import FEATURE_DTYPES

__all__ = ["FEATURE_DTYPES", "dequantise", "each", "parts", "quantise", "stored", "to_device"]

SCALE_DTYPE = np.float16  # one scale per patch vector; float32 measured no better (benchmarks.md)
LEVELS = 127  # symmetric: -127..127 (-128 unused, so the code range is symmetric about 0)

Stored = Any  # np.ndarray | torch.Tensor | tuple of two of them (codes, scales)


def quantise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float features (..., C) -> (codes (..., C) int8, scales (...) float16), one scale per
    vector; an all-zero vector (a failed image's row) gets scale 0 and codes 0."""
    x = np.asarray(x, np.float32)
    scales = (np.abs(x).max(-1) / LEVELS).astype(SCALE_DTYPE)  # (...)
    s = scales.astype(np.float32)[..., None]
    q = np.divide(x, s, out=np.zeros_like(x), where=s > 0)
    codes = np.clip(np.rint(q), -LEVELS, LEVELS).astype(np.int8)  # fp16 rounding may pass 127
    return codes, scales


def dequantise(x: Stored) -> Any:
    """A stored batch as float32 (numpy or torch, as given): codes x scales for a pair."""
    if isinstance(x, tuple):
        codes, scales = x
        if isinstance(codes, torch.Tensor):
            return codes.float() * scales.float().unsqueeze(-1)
        return codes.astype(np.float32) * scales.astype(np.float32)[..., None]
    return x.float() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)


def parts(x: Stored) -> list:
    """The arrays of a stored batch: [features], or [codes, scales]."""
    return list(x) if isinstance(x, tuple) else [x]


def stored(arrays: list) -> Stored:
    """The stored batch of its arrays (`parts`' inverse)."""
    return arrays[0] if len(arrays) == 1 else tuple(arrays)


def each(x: Stored, fn: Callable[[Any], Any]) -> Stored:
    """`fn` applied to a stored batch's array, or to both arrays of a pair (indexing, reshaping,
    `torch.from_numpy`): rows stay aligned with their scales."""
    return tuple(fn(a) for a in x) if isinstance(x, tuple) else fn(x)


def to_device(x: Stored, device: torch.device) -> torch.Tensor:
    """A stored batch of tensors copied to `device` as stored (int8 + scales: half of float16's
    bytes), then float32 there."""
    return dequantise(each(x, lambda a: a.to(device, non_blocking=True)))
