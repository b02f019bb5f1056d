"""Request payloads -> the model's input contract (float32 (N, 28, 28) in [0, 1]): JSON images
(v1, v2) and uploaded pictures."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np

from pipeline.data.digits import ImageError, image_bytes_to_mnist
from services.serving.schemas import SIDE, DecodeBusy, InputError, PredictRequest, V2Tensor
from services.serving.settings import ServingSettings

_SHAPES = ((SIDE, SIDE), (1, SIDE, SIDE), (SIDE * SIDE,))
# ImageError kinds -> statuses; each kind is also the JSON error's kind.
IMAGE_STATUS = {"too_large": 413, "unsupported_format": 415, "unreadable": 400, "no_digit": 422}


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


def v2_images(tensor: V2Tensor, limit: int) -> np.ndarray:
    """An inference-protocol input tensor: FP* in [0, 1], integer types 0-255."""
    shape, data = "inputs.0.shape", "inputs.0.data"
    if len(tensor.shape) < 2 or tuple(tensor.shape[1:]) not in _SHAPES:
        raise InputError(shape, f"{tensor.shape} is not [N, 28, 28], [N, 1, 28, 28] or [N, 784]")
    count, size = tensor.shape[0], math.prod(tensor.shape)
    if count == 0:
        raise InputError(shape, "no images (N = 0)")
    _check_count(count, limit, shape)
    try:
        values = np.asarray(tensor.data, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError):
        raise InputError(data, "not a (nested) list of numbers") from None
    if values.size != size:
        raise InputError(data, f"{values.size} values for shape {tensor.shape} ({size})")
    if not np.isfinite(values).all():
        raise InputError(data, "NaN or infinite values")
    top = 1.0 if tensor.datatype.startswith("FP") else 255.0
    if values.min() < 0.0 or values.max() > top:
        raise InputError(data, f"values must lie in [0, {top:g}] for {tensor.datatype}")
    images = values.reshape(count, SIDE, SIDE).astype(np.float32)
    return images if top == 1.0 else images / np.float32(255.0)


class UploadDecoder:
    """Decodes uploads in worker threads, at most `slots` at once and `queue` waiting, which with
    the pixel budget bounds their memory; a slot is given back when the thread ends, not the
    request: a client that hangs up cannot make room while its decode still runs."""

    def __init__(self, settings: ServingSettings) -> None:
        self.slots, self.queue = settings.max_image_decodes, settings.max_image_queue
        self._max_pixels = settings.max_image_pixels
        self._semaphore = asyncio.Semaphore(self.slots)
        self._admitted = 0  # running or waiting

    async def decode(self, data: bytes) -> np.ndarray:
        """A PNG or JPEG upload, made MNIST-style: float32 (1, 28, 28)."""
        if not data:
            raise InputError("file", "empty upload")
        if self._admitted >= self.slots + self.queue:
            raise DecodeBusy(
                f"busy: {self.slots} image decodes running and {self.queue} waiting; "
                "retry in a moment"
            )
        self._admitted += 1
        try:
            await self._semaphore.acquire()
        except BaseException:
            self._admitted -= 1
            raise
        work = asyncio.create_task(asyncio.to_thread(image_bytes_to_mnist, data, self._max_pixels))
        work.add_done_callback(self._release)
        try:
            return (await asyncio.shield(work))[None]
        except ImageError as error:
            raise InputError("file", str(error), IMAGE_STATUS[error.kind], error.kind) from None

    def _release(self, work: asyncio.Future[Any]) -> None:
        self._semaphore.release()
        self._admitted -= 1
        if not work.cancelled():
            work.exception()  # seen here, so an abandoned request's error is not reported twice
