"""Reading IDX files (the MNIST container format) with full validation."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

_UBYTE = 0x08


class IdxError(ValueError):
    """A malformed IDX file; the message names the file and the problem."""


def parse_idx(data: bytes, ndim: int, source: str = "<bytes>") -> np.ndarray:
    if len(data) < 4:
        raise IdxError(f"{source}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != _UBYTE or dims != ndim:
        raise IdxError(
            f"{source}: bad magic number 0x{int.from_bytes(data[:4], 'big'):08x} "
            f"(expected 0x{(_UBYTE << 8) | ndim:08x}: unsigned bytes, {ndim} dimension(s))"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{source}: truncated header ({len(data)} of {header} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if any(size == 0 for size in shape):
        raise IdxError(f"{source}: empty dimension in shape {shape}")
    expected = header + math.prod(shape)
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise IdxError(
            f"{source}: {problem}: {len(data)} bytes, expected {expected} for shape {shape}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_images(path: Path) -> np.ndarray:
    images = parse_idx(path.read_bytes(), 3, str(path))
    if images.shape[1:] != (28, 28):
        raise IdxError(f"{path}: images are {images.shape[1:]}, expected 28x28")
    return images


def read_labels(path: Path) -> np.ndarray:
    labels = parse_idx(path.read_bytes(), 1, str(path))
    if labels.max() > 9:
        raise IdxError(f"{path}: label {int(labels.max())} is not a digit")
    return labels
