"""Image uploads: a drawing's latency, the peak memory of large uploads and bombs."""

import contextlib
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from bench import common
from bench.report import header, table, write
from testkit.bombs import BOMBS, encode

COLUMNS = (
    "code={code} | 280² p50 / p99 ms={p50_ms:.2f} / {p99_ms:.2f} | 4096² PNG peak MB="
    "{PNG_peak_mb:.1f} | 4096² JPEG peak MB={JPEG_peak_mb:.1f} | 8 bombs peak MB="
    "{bombs_peak_mb:.1f} | 8 bombs' status={bombs_status}"
)


def rss_kib(pid: int, field: str) -> int:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in lines if line.startswith(f"{field}:"))


def at_once(url: str, pid: int, bodies: list[bytes]) -> tuple[float, list[int]]:
    """`bodies` at once: the statuses, the server's peak RSS growth (VmHWM, 2 ms samples), MB."""

    def upload(body: bytes) -> int:
        with httpx.Client(timeout=60) as http:
            return http.post(f"{url}/v1/predict/image", files={"file": ("x", body)}).status_code

    def sample() -> None:
        while not done.wait(0.002):
            peak.append(rss_kib(pid, "VmRSS"))

    before, done, reset = rss_kib(pid, "VmRSS"), threading.Event(), False
    peak, sampler = [before], threading.Thread(target=sample)
    with contextlib.suppress(OSError):
        reset = Path(f"/proc/{pid}/clear_refs").write_text("5") > 0
    sampler.start()
    with ThreadPoolExecutor(len(bodies)) as pool:
        statuses = list(pool.map(upload, bodies))
    done.set()
    sampler.join()
    return (max(peak + [rss_kib(pid, "VmHWM")] * reset) - before) / 1024, statuses


def measure(url: str, pid: int, digits: np.ndarray, requests: int, bombs: bool) -> dict[str, Any]:
    """Drawing upload p50/p99; peak RSS growth of the largest PNG and JPEG, of 8 `bombs`."""

    def picture(digit: np.ndarray, size: int) -> Image.Image:  # dark digit on light paper
        return Image.fromarray(255 - digit).resize((size, size), Image.Resampling.BILINEAR)

    drawings, times = [encode(picture(digit, 280), "PNG") for digit in digits[:50]], []
    with httpx.Client(timeout=60) as http:
        for index in range(requests + 50):
            started, files = time.perf_counter(), {"file": ("d.png", drawings[index % 50])}
            http.post(f"{url}/v1/predict/image", files=files).raise_for_status()
            times.append((time.perf_counter() - started) * 1000)
    p50, p99 = np.percentile(times[50:], [50, 99])
    result: dict[str, Any] = {"p50_ms": float(p50), "p99_ms": float(p99)}
    for kind, options in (("PNG", {}), ("JPEG", {"quality": 90})):
        # The largest accepted upload: 4096², a photo-like image under the 4 MiB body limit.
        body = encode(picture(digits[0], 4096).convert("RGB"), kind, **options)
        result[f"{kind}_peak_mb"], result[f"{kind}_status"] = at_once(url, pid, [body])
        result[f"{kind}_bytes"] = len(body)
    if bombs:  # testkit's, eight at once
        bodies = [build() for build, _ in BOMBS.values()]
        eight = [bodies[index % len(bodies)] for index in range(8)]
        result["bombs_peak_mb"], statuses = at_once(url, pid, eight)
        result["bombs_status"] = sorted(statuses)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--baseline", help="a commit to measure too (no bombs there)")
    parser.add_argument("--requests", type=int, default=400, help="timed drawing uploads (400)")
    args = parser.parse_args(argv)
    from bench.serving.run import prepare_data
    from pipeline.data.prepared import open_prepared
    from testkit.processes import free_port, running
    from testkit.registry import champion

    report, workdir = common.begin("image-upload", args, argv)
    params = prepare_data(workdir / "data", 3000)
    model_uri = f"models:/{params.mlflow.registered_model}@champion"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVING_", "MLFLOW_"))}
    env |= {"MLFLOW_TRACKING_URI": champion(params, workdir)[0], "SERVING_MODEL_URI": model_uri}
    digits, report["rows"] = open_prepared(Path(params.paths.prepared)).load("test").images, []
    trees = {"this tree": common.REPO}
    if args.baseline:  # extracted by `git archive`
        trees[args.baseline] = workdir / "baseline"
        trees[args.baseline].mkdir()
        archive = ["git", "-C", str(common.REPO), "archive", args.baseline]
        tar = subprocess.run(archive, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(trees[args.baseline])], input=tar, check=True)
    for name, code in trees.items():
        port = free_port()
        command = [sys.executable, "-m", "pipeline", "serve", "--port", str(port)]
        url, log = f"http://127.0.0.1:{port}", workdir / f"{port}.log"
        server_env = env | {"PYTHONPATH": str(code), "SERVING_CACHE_DIR": str(workdir / str(port))}
        with running(command, f"{url}/health/ready", log, server_env, 180) as process:
            found = measure(url, process.pid, digits, args.requests, name == "this tree")
        report["rows"].append({"code": name} | found)
        common.log(f"{name}: {found}")
    parts = [header("Image uploads: latency and memory", "bench.image_upload", report)]
    write("image_upload", report, parts + table(report["rows"], COLUMNS), args.out_dir)
    common.finish(args, workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
