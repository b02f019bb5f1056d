"""Image uploads (`POST /v1/predict/image`): latency of a typical drawing, peak memory of the
largest accepted uploads and of eight bombs at once; this tree, and optionally an older commit
served the same model, for a before/after.

    .venv/bin/python bench/image_upload.py --baseline 9df90df
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.append(str(Path(__file__).resolve().parent))

import common  # noqa: E402
import serving  # noqa: E402

from testkit.bombs import BOMBS, encode  # noqa: E402


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def peak_growth_mb(pid: int, action: Callable[[], object]) -> float:
    """Peak RSS during `action` minus RSS before it: VmHWM after a reset where the kernel lets
    us reset it, and a 2 ms VmRSS sampler in any case."""
    before = rss_kib(pid, "VmRSS")
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(rss_kib(pid, "VmRSS"))
            time.sleep(0.002)

    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        action()
    finally:
        done.set()
        sampler.join()
    if reset:
        peak.append(rss_kib(pid, "VmHWM"))
    return (max(peak) - before) / 1024


def upload(url: str, data: bytes) -> httpx.Response:
    with httpx.Client(timeout=60) as http:
        return http.post(f"{url}/v1/predict/image", files={"file": ("x.png", data, "image/png")})


def at_once(url: str, bodies: list[bytes]) -> list[int]:
    statuses: list[int] = []
    threads = [
        threading.Thread(target=lambda body=body: statuses.append(upload(url, body).status_code))
        for body in bodies
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def largest(digit: np.ndarray, format: str) -> bytes:
    """A 4096 x 4096 photo-like upload (dark digit on light paper) under the 4 MiB body limit."""
    picture = Image.fromarray(255 - digit).resize((4096, 4096), Image.Resampling.BILINEAR)
    return encode(picture.convert("RGB"), format, **({"quality": 90} if format == "JPEG" else {}))


def latency_ms(url: str, drawings: list[bytes], count: int) -> dict[str, float]:
    times = []
    with httpx.Client(timeout=60) as http:
        for index in range(count + 50):
            body = drawings[index % len(drawings)]
            started = time.perf_counter()
            reply = http.post(f"{url}/v1/predict/image", files={"file": ("d.png", body)})
            if index >= 50:  # the first ones warm up
                times.append((time.perf_counter() - started) * 1000)
            if reply.status_code != 200:
                raise RuntimeError(reply.text)
    return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99))}


def measure(server: serving.Server, digits: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    assert server.process is not None
    pid, url = server.process.pid, server.ready_url.rsplit("/health", 1)[0]
    drawings = [
        encode(Image.fromarray(255 - digit).resize((280, 280), Image.Resampling.BILINEAR), "PNG")
        for digit in digits[:50]
    ]
    result: dict[str, Any] = {"latency_280_ms": latency_ms(url, drawings, args.requests)}
    for format in ("PNG", "JPEG"):
        body = largest(digits[0], format)
        replies: list[httpx.Response] = []
        growth = peak_growth_mb(pid, lambda: replies.append(upload(url, body)))  # noqa: B023
        status = replies[0].status_code
        result[f"largest_{format}"] = {"bytes": len(body), "status": status, "peak_mb": growth}
    if not args.skip_bombs and server.name == "this tree":
        bodies = [build() for build, _ in BOMBS.values()]
        bodies = [bodies[index % len(bodies)] for index in range(8)]
        statuses = []
        growth = peak_growth_mb(pid, lambda: statuses.extend(at_once(url, bodies)))
        result["eight_bombs"] = {"status": sorted(statuses), "peak_mb": growth}
    result["rss_mb_after"] = rss_kib(pid, "VmRSS") / 1024
    return result


def start(name: str, code: Path, env: dict[str, str], workdir: Path) -> serving.Server:
    port = serving.free_port()
    server = serving.Server(
        name=name,
        kind="ours",
        command=[sys.executable, "-m", "pipeline", "serve", "--port", str(port)],
        env=env | {"PYTHONPATH": str(code), "SERVING_CACHE_DIR": str(workdir / f"cache-{port}")},
        ready_url=f"http://127.0.0.1:{port}/health/ready",
        predict_url=f"http://127.0.0.1:{port}/v1/predict/image",
        log=workdir / f"{port}.log",
        cpus=None,
        fail_marker="model refresh failed",
    )
    server.start()
    server.wait_ready(180)
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="a commit to measure too (bombs skipped there)")
    parser.add_argument("--requests", type=int, default=400, help="timed drawing uploads")
    parser.add_argument("--skip-bombs", action="store_true")
    args = parser.parse_args()
    _, workdir = common.begin("image-upload", None)
    params = serving.prepare_data(workdir / "data", 3000, 1000, 1)
    tracking_uri, model_uri = serving.train_and_register(params, workdir)
    from pipeline.data.prepared import open_prepared

    digits = open_prepared(Path(params.paths.prepared)).load("test").images
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVING_", "MLFLOW_"))}
    env |= {"MLFLOW_TRACKING_URI": tracking_uri, "SERVING_MODEL_URI": model_uri}
    trees = {"this tree": REPO}
    if args.baseline:
        trees[args.baseline] = workdir / "baseline"
        trees[args.baseline].mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.baseline], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(trees[args.baseline])], input=archive, check=True)
    report = {}
    for name, code in trees.items():
        server = start(name, code, env, workdir)
        try:
            report[name] = measure(server, digits, args)
        finally:
            server.stop()
        common.log(f"{name}: {report[name]}")
    lines = [
        "| code | 280x280 p50 / p99 ms | 4096² PNG peak MB | 4096² JPEG peak MB | 8 bombs peak MB |"
    ]
    lines.append("| --- | --- | --- | --- | --- |")
    for name, row in report.items():
        latency = row["latency_280_ms"]
        peaks = [row["largest_PNG"]["peak_mb"], row["largest_JPEG"]["peak_mb"]]
        peaks.append(row.get("eight_bombs", {}).get("peak_mb"))
        lines.append(
            f"| {name} | {common.fmt(latency['p50'], 2)} / {common.fmt(latency['p99'], 2)} | "
            + " | ".join(common.fmt(peak) for peak in peaks)
            + " |"
        )
    common.finish(workdir, False, "\n".join(lines) + f"\n\n{report}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
