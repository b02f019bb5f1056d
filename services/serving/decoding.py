"""A bound on image decodes in flight: memory per decode is bounded by the pixel budget, so
the number of decodes at once bounds the service's memory for uploads."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class DecodeBusy(Exception):
    """Every decode slot is taken and the queue for them is full."""

    def __init__(self, slots: int, queue: int) -> None:
        super().__init__(
            f"busy: {slots} image decodes running and {queue} waiting; retry in a moment"
        )


class DecodeGate:
    """Runs a function in a worker thread, at most `slots` at once, at most `queue` waiting.

    A slot is given back when the thread ends, not when the request does: a client that
    hangs up cannot make room for another decode while its own is still running.
    """

    def __init__(self, slots: int, queue: int) -> None:
        self.slots = slots
        self.queue = queue
        self._semaphore = asyncio.Semaphore(slots)
        self._admitted = 0  # running or waiting

    @property
    def admitted(self) -> int:
        return self._admitted

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._admitted >= self.slots + self.queue:
            raise DecodeBusy(self.slots, self.queue)
        self._admitted += 1
        try:
            await self._semaphore.acquire()
        except BaseException:
            self._admitted -= 1
            raise
        work = asyncio.ensure_future(asyncio.to_thread(function, *args, **kwargs))
        work.add_done_callback(self._release)
        return await asyncio.shield(work)

    def _release(self, work: asyncio.Future[Any]) -> None:
        self._semaphore.release()
        self._admitted -= 1
        if not work.cancelled():
            work.exception()  # seen here, so an abandoned request's error is not reported twice
