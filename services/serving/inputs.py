"""Request payloads -> the model's input contract (float32 (N, 28, 28) in [0, 1])."""

from __future__ import annotations

import math

import numpy as np

from services.serving.schemas import SIDE, PredictRequest, V2Tensor


class InputError(ValueError):
    """A client error in the payload, naming the field; `kind` is the JSON error's kind."""

    def __init__(
        self, field: str, problem: str, status: int = 422, kind: str = "invalid_input"
    ) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
        self.status = status
        self.kind = kind


def _check_count(count: int, limit: int, field: str) -> None:
    if count > limit:
        raise InputError(field, f"{count} images in one request; the limit is {limit}", 413)


def v1_images(request: PredictRequest, limit: int) -> np.ndarray:
    """Each image on its own scale: all values in [0, 1] as they are, else 0-255 divided."""
    _check_count(len(request.images), limit, "images")
    images = np.asarray(request.images, dtype=np.float32)
    on_byte_scale = images.reshape(len(images), -1).max(axis=1) > 1.0
    images[on_byte_scale] /= 255.0
    return images


_SHAPES = ((SIDE, SIDE), (1, SIDE, SIDE), (SIDE * SIDE,))


def v2_images(tensor: V2Tensor, limit: int) -> np.ndarray:
    """An inference-protocol input tensor: FP* in [0, 1], integer types 0-255."""
    field = "inputs.0"
    if len(tensor.shape) < 2 or tuple(tensor.shape[1:]) not in _SHAPES:
        raise InputError(
            f"{field}.shape",
            f"{tensor.shape} is not [N, 28, 28], [N, 1, 28, 28] or [N, 784]",
        )
    count = tensor.shape[0]
    if count == 0:
        raise InputError(f"{field}.shape", "no images (N = 0)")
    _check_count(count, limit, f"{field}.shape")
    try:
        values = np.asarray(tensor.data, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError):
        raise InputError(f"{field}.data", "not a (nested) list of numbers") from None
    if values.size != math.prod(tensor.shape):
        raise InputError(
            f"{field}.data",
            f"{values.size} values for shape {tensor.shape} ({math.prod(tensor.shape)})",
        )
    if not np.isfinite(values).all():
        raise InputError(f"{field}.data", "NaN or infinite values")
    top = 1.0 if tensor.datatype.startswith("FP") else 255.0
    if values.min() < 0.0 or values.max() > top:
        raise InputError(f"{field}.data", f"values must lie in [0, {top:g}] for {tensor.datatype}")
    images = values.reshape(count, SIDE, SIDE).astype(np.float32)
    return images if top == 1.0 else images / np.float32(255.0)
