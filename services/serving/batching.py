"""Micro-batching: concurrent requests share one inference call.

Requests queue their images; one task drains the queue, waiting at most `max_wait_s` for
more once it holds a request, and runs the batch in a worker thread so the event loop never
blocks on inference. Each batch uses one model reference, so each result names the version
that produced it, also while a new version is being swapped in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from services.serving.background import Background
from services.serving.model import ServedModel


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future[tuple[np.ndarray, ServedModel]] = field(repr=False)


class MicroBatcher:
    def __init__(
        self,
        current_model: Callable[[], ServedModel],
        max_images: int,
        max_wait_s: float,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self._current_model = current_model
        self._max_images = max_images
        self._max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._background = Background(self._run, "micro-batcher")

    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()

    async def predict(self, images: np.ndarray) -> tuple[np.ndarray, ServedModel]:
        """Probabilities for `images` (float32 (N, 28, 28)), and the model that made them."""
        future: asyncio.Future[tuple[np.ndarray, ServedModel]] = (
            asyncio.get_running_loop().create_future()
        )
        await self._queue.put(_Pending(images, future))
        return await future

    async def _collect(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        size = len(batch[0].images)
        deadline = time.monotonic() + self._max_wait_s
        while size < self._max_images:
            if self._queue.empty():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            batch.append(item)
            size += len(item.images)
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            try:
                model = self._current_model()
                images = np.concatenate([pending.images for pending in batch])
                self._on_batch(len(images))
                probabilities = await asyncio.to_thread(model.predict, images)
            except Exception as error:  # noqa: BLE001 - every waiter must hear of it
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                continue
            start = 0
            for pending in batch:
                end = start + len(pending.images)
                if not pending.future.done():  # the client may have gone
                    pending.future.set_result((probabilities[start:end], model))
                start = end
