"""The serving benchmark's load generator: asyncio + aiohttp, closed and open loops."""

import asyncio
import gc
import json
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import aiohttp
import numpy as np

from bench.common import CpuMeter

JSON = {"content-type": "application/json"}
OPEN_LOOP_CONNECTIONS = 64
Sample = tuple[float, list[float], Counter[str]]  # elapsed s, latencies s, errors by kind


async def drive(
    url: str, bodies: list[bytes], seconds: float, concurrency: int, rate: float
) -> Sample:
    """A closed loop of `concurrency` workers, or (0) the open loop at `rate` a second."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=concurrency or OPEN_LOOP_CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()

        async def one(index: int, since: float) -> None:
            body = bodies[index % len(bodies)]
            try:
                async with session.post(url, data=body, headers=JSON) as reply:
                    await reply.read()
                    problem = None if reply.status == 200 else f"http_{reply.status}"
            except (aiohttp.ClientError, TimeoutError) as error:
                problem = type(error).__name__
            if problem is None:
                latencies.append(time.perf_counter() - since)
            else:
                errors[problem] += 1

        async def worker(index: int, step: int) -> None:
            while time.perf_counter() < start + seconds:
                await one(index, time.perf_counter())
                index += step

        if concurrency:
            await asyncio.gather(*(worker(i, concurrency) for i in range(concurrency)))
        else:
            tasks = []
            for index in range(int(seconds * rate)):
                scheduled = start + index / rate
                await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
                tasks.append(asyncio.create_task(one(index, scheduled)))
            await asyncio.gather(*tasks)
        return time.perf_counter() - start, latencies, errors


def payloads(images: np.ndarray, batch: int) -> dict[str, dict[str, list[bytes]]]:
    """JSON bodies encoded once, the same values for ours and MLflow: 256 images, 8 batches."""
    singles = [image[None] for image in images[:256]]
    batches = [images[start : start + batch] for start in range(0, 8 * batch, batch)]
    found: dict[str, dict[str, list[bytes]]] = {}
    for kind, key in (("ours", "images"), ("mlflow", "inputs")):
        encoded = [json.dumps({key: chunk.tolist()}).encode() for chunk in singles + batches]
        found[kind] = {"single": encoded[: len(singles)], "batch": encoded[len(singles) :]}
    return found


def measure(pid: int, run: Coroutine[Any, Any, Sample], images: int) -> dict[str, Any]:
    # No collector pauses in the client, which holds torch's and MLflow's objects, while measuring.
    gc.collect()
    gc.disable()
    try:
        server, own = CpuMeter(pid), time.process_time()
        elapsed, latencies, errors = asyncio.run(run)
        server.stop()
        own = time.process_time() - own
    finally:
        gc.enable()
    ms, done = np.asarray(latencies or [np.nan]) * 1000, len(latencies)
    found: dict[str, Any] = {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 99)}
    found |= {"requests": done, "errors": sum(errors.values()), "error_kinds": dict(errors)}
    found |= {"req_per_s": done / elapsed, "images_per_s": done * images / elapsed}
    found |= {"max_ms": float(ms.max()), "server_cpu_pct": 100 * server.own_s / elapsed}
    found["req_per_server_cpu_s"] = done / server.own_s if server.own_s > 0 else None
    other = max(0.0, server.busy_s - server.own_s - own)
    return found | {"client_cpu_pct": 100 * own / elapsed, "other_cpu_pct": 100 * other / elapsed}
