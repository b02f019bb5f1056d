"""Micro-batching: concurrent requests share one inference call, run in a worker thread so the
event loop never blocks; one model reference per batch, so each result names the version that
made it, also while a new one is swapped in."""

from __future__ import annotations

import asyncio
import time
from typing import NamedTuple

import numpy as np

from services.serving.model import ModelHolder, ServedModel

Result = tuple[np.ndarray, ServedModel]


class _Pending(NamedTuple):
    images: np.ndarray
    future: asyncio.Future[Result]


class MicroBatcher:
    """Batches for the holder's model, as its settings say (SERVING_BATCH_*)."""

    def __init__(self, holder: ModelHolder) -> None:
        self._holder, self._metrics = holder, holder.metrics
        self._max_images = holder.settings.batch_max_images
        self._max_wait_s = holder.settings.batch_max_wait_ms / 1000
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()

    async def predict(self, images: np.ndarray) -> Result:
        self._holder.require()  # no model yet: refused now, not after waiting in the queue
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
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

    async def run(self) -> None:
        while True:
            batch = await self._collect()
            try:
                model = self._holder.require()
                images = np.concatenate([pending.images for pending in batch])
                self._metrics.batch_size.observe(len(images))
                probabilities = await asyncio.to_thread(model.predict, images)
            except Exception as error:  # noqa: BLE001 - every waiter must hear of it
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                continue
            self._metrics.images.inc(len(images))
            ends = np.cumsum([len(pending.images) for pending in batch])[:-1]
            for pending, rows in zip(batch, np.split(probabilities, ends), strict=True):
                if not pending.future.done():  # the client may have gone
                    pending.future.set_result((rows, model))
