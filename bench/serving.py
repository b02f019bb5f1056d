"""Serving benchmark: this service (`python -m pipeline serve`) against `mlflow models serve`,
both serving the same registered model, loaded with the same images.

    .venv/bin/python bench/serving.py                 # train a small model, serve, measure
    .venv/bin/python bench/serving.py --tracking-uri sqlite:////abs/mlflow.db \\
        --model-uri models:/mnist-classifier@champion

Writes bench/results/serving.md (tables, targets, notes) and bench/results/serving.json.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python bench/serving.py` from anywhere: the project imports
sys.path.append(str(Path(__file__).resolve().parent))  # `common`; the repo goes first

import common  # noqa: E402

from testkit.processes import free_port, wait_for_http  # noqa: E402

BIN = Path(sys.executable).parent
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
TARGET_RATIO = 2.0  # our throughput / mlflow's, single images at concurrency 16
TARGET_P99_MS = 10.0  # our p99 at the open-loop rate
# The second variant of our service, unless --variant says otherwise: the batcher's wait for
# company (added to every request that arrives alone) at 0.5 ms, or at 2 ms where 0.5 ms is
# already the service's default.
WAITS_MS = (0.5, 2.0)
OPEN_LOOP_CONNECTIONS = 64
DISTURBED_PCT = 15.0  # other processes' CPU use (% of one CPU) that makes a row suspect
JSON = {"content-type": "application/json"}

# --------------------------------------------------------------------------- model and data


def prepare_data(root: Path, train_limit: int, test_limit: int, epochs: int) -> Any:
    """MNIST through the real fetch and prepare stages into `root`; a small CNN's params."""
    from testkit.data import fetch_and_prepare, params_under

    overrides = {
        "prepare.train_limit": train_limit,
        "prepare.val_size": 1000,
        "prepare.test_limit": test_limit,
        "train.cnn.epochs": epochs,
        "train.cnn.augment": False,
        "train.cnn.net.channels": [16, 32, 64],
    }
    params = params_under(root, overrides, "benchmark params")
    fetch_and_prepare(params)
    return params


def train_and_register(params: Any, root: Path) -> tuple[str, str]:
    """The small CNN trained in-process and registered as champion (the tests' fixture).
    Returns (tracking URI, model URI)."""
    from testkit.registry import champion

    uri, _ = champion(params, root)
    return uri, f"models:/{params.mlflow.registered_model}@champion"


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    kind: str  # ours | mlflow: which payloads it takes
    command: list[str]
    env: dict[str, str]
    ready_url: str
    predict_url: str
    log: Path
    cpus: set[int] | None
    fail_marker: str | None = None  # a log line that means it will never become ready
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        sink = self.log.open("wb")
        cpus = self.cpus

        def pin() -> None:  # in the child, before exec: its whole process tree inherits it
            if cpus:
                os.sched_setaffinity(0, cpus)

        self.process = subprocess.Popen(
            self.command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # its own process group: stop() reaches its workers too
            preexec_fn=pin,
        )
        sink.close()

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until `ready_url` answers 200; raises with the log tail otherwise."""
        assert self.process is not None
        try:
            return wait_for_http(
                self.ready_url, self.process, self.log, timeout_s, self.fail_marker
            )
        except RuntimeError as error:
            raise RuntimeError(f"{self.name}: {error}") from None

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else ""

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 15 s; waits for the leader."""
        process = self.process
        if process is None or process.poll() is not None and not _group_alive(process.pid):
            return
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                process.poll()
                if process.returncode is not None and not _group_alive(process.pid):
                    return
                time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- load generation


@dataclass
class Result:
    server: str
    scenario: str
    mode: str  # closed | open
    concurrency: int | None
    images_per_request: int
    target_rate: float | None
    duration_s: float
    requests: int
    errors: int
    req_per_s: float
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    server_cpu_pct: float  # of one CPU, the server's whole process tree
    req_per_server_cpu_s: float  # requests per CPU-second of the server: its efficiency
    client_cpu_pct: float  # of one CPU, this process (the load generator)
    other_cpu_pct: float  # of one CPU, everything else on the machine: should be near 0
    error_kinds: dict[str, int] = field(default_factory=dict)


@dataclass
class Sample:
    """What one measured run collected."""

    elapsed: float
    latencies: list[float]
    errors: Counter[str]
    client_cpu_s: float  # this process's CPU time over `elapsed`


async def _send(session: aiohttp.ClientSession, url: str, body: bytes) -> str | None:
    """One request; None when it got a 200, else what went wrong."""
    try:
        async with session.post(url, data=body, headers=JSON) as reply:
            await reply.read()
            return None if reply.status == 200 else f"http_{reply.status}"
    except (aiohttp.ClientError, TimeoutError) as error:
        return type(error).__name__


def _session(connections: int) -> aiohttp.ClientSession:
    # aiohttp, not httpx: httpx's client saturated the load generator's CPU at ~1,000 req/s,
    # so the faster server was measured by the client's ceiling, not its own.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=30),
    )


async def closed_loop(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> Sample:
    """`concurrency` workers, each sending its next request as soon as the last returns,
    over a pool of `concurrency` keep-alive connections."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    async with _session(concurrency) as session:
        started, cpu_started = time.perf_counter(), time.process_time()
        stop_at = started + seconds

        async def worker(offset: int) -> None:
            index = offset
            while time.perf_counter() < stop_at:
                sent = time.perf_counter()
                problem = await _send(session, url, bodies[index % len(bodies)])
                index += concurrency
                if problem is None:
                    latencies.append(time.perf_counter() - sent)
                else:
                    errors[problem] += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        # Requests sent before stop_at finish after it: the rate is over the time they took.
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    return Sample(elapsed, latencies, errors, cpu)


async def open_loop(url: str, bodies: list[bytes], rate: float, seconds: float) -> Sample:
    """Requests at fixed times (`rate` per second) whatever the replies do; latency counts
    from the scheduled time, so a stalled server cannot hide its queue (no coordinated
    omission)."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    tasks: set[asyncio.Task[None]] = set()
    async with _session(OPEN_LOOP_CONNECTIONS) as session:
        start, cpu_started = time.perf_counter() + 0.01, time.process_time()

        async def one(index: int, scheduled: float) -> None:
            problem = await _send(session, url, bodies[index % len(bodies)])
            if problem is None:
                latencies.append(time.perf_counter() - scheduled)
            else:
                errors[problem] += 1

        for index in range(int(seconds * rate)):
            scheduled = start + index / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(index, scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu_started
    return Sample(elapsed, latencies, errors, cpu)


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by `pid` and its descendants."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all CPUs, not idle or waiting on I/O)."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def measure(
    server: Server, scenario: str, images: int, bodies: list[bytes], args: argparse.Namespace
) -> Result:
    """Warm up (not recorded), then one measured run, with both sides' CPU use."""
    assert server.process is not None
    if scenario.startswith("open"):
        asyncio.run(open_loop(server.predict_url, bodies, args.rate, args.warmup))
        run = open_loop(server.predict_url, bodies, args.rate, args.rate_duration)
        mode, concurrency, rate = "open", None, args.rate
    else:
        concurrency = int(scenario.rpartition("c=")[2])
        asyncio.run(closed_loop(server.predict_url, bodies, concurrency, args.warmup))
        run = closed_loop(server.predict_url, bodies, concurrency, args.duration)
        mode, rate = "closed", None
    # No collector pauses in the client while measuring: this process holds torch's and
    # MLflow's objects, and a full collection of them stalls every request for ~0.3 s.
    gc.collect()
    gc.disable()
    try:
        server_before, machine_before = _tree_cpu_s(server.process.pid), _busy_cpu_s()
        own_before = time.process_time()
        sample = asyncio.run(run)
        server_cpu = _tree_cpu_s(server.process.pid) - server_before
        own_cpu = time.process_time() - own_before
        other_cpu = _busy_cpu_s() - machine_before - server_cpu - own_cpu
    finally:
        gc.enable()
    values = np.asarray(sample.latencies or [np.nan], dtype=np.float64) * 1000
    done = len(sample.latencies)
    result = Result(
        server=server.name,
        scenario=scenario,
        mode=mode,
        concurrency=concurrency,
        images_per_request=images,
        target_rate=rate,
        duration_s=round(sample.elapsed, 3),
        requests=done,
        errors=sum(sample.errors.values()),
        req_per_s=done / sample.elapsed,
        images_per_s=done * images / sample.elapsed,
        p50_ms=float(np.percentile(values, 50)),
        p90_ms=float(np.percentile(values, 90)),
        p99_ms=float(np.percentile(values, 99)),
        max_ms=float(values.max()),
        mean_ms=float(values.mean()),
        server_cpu_pct=100 * server_cpu / sample.elapsed,
        req_per_server_cpu_s=done / server_cpu if server_cpu > 0 else float("nan"),
        client_cpu_pct=100 * sample.client_cpu_s / sample.elapsed,
        other_cpu_pct=max(0.0, 100 * other_cpu / sample.elapsed),
        error_kinds=dict(sample.errors),
    )
    print(
        f"[bench] {result.server:10} {result.scenario:16} {result.req_per_s:8.1f} req/s "
        f"{result.images_per_s:8.0f} img/s  p50 {result.p50_ms:7.2f}  p99 {result.p99_ms:7.2f} ms"
        f"  cpu server {result.server_cpu_pct:3.0f}% client {result.client_cpu_pct:3.0f}%"
        f" other {result.other_cpu_pct:3.0f}%"
        f"  errors {result.errors}",
        flush=True,
    )
    return result


# --------------------------------------------------------------------------- payloads


def payloads(images: np.ndarray, batch: int) -> dict[str, dict[str, list[bytes]]]:
    """JSON bodies, encoded once: the same float values for both kinds of server."""
    singles = [image[None] for image in images[:256]]
    batches = [images[start : start + batch] for start in range(0, len(images) - batch + 1, batch)]
    batches = batches[:8]

    def encode(key: str, chunk: np.ndarray) -> bytes:
        return json.dumps({key: chunk.tolist()}).encode()

    return {
        kind: {
            "single": [encode(key, chunk) for chunk in singles],
            "batch": [encode(key, chunk) for chunk in batches],
        }
        for kind, key in (("ours", "images"), ("mlflow", "inputs"))
    }


def check_agreement(
    ours_url: str, mlflow_url: str, images: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """Both servers on the same 256 images: digits agree, probabilities close, accuracy."""
    chunk = images[:256]
    with httpx.Client(timeout=60) as http:
        ours = http.post(ours_url, json={"images": chunk.tolist()})
        theirs = http.post(mlflow_url, json={"inputs": chunk.tolist()})
    ours.raise_for_status()
    theirs.raise_for_status()
    ours_p = np.asarray([p["probabilities"] for p in ours.json()["predictions"]])
    theirs_p = np.asarray(theirs.json()["predictions"])
    return {
        "images": len(chunk),
        "digits_agree": float((ours_p.argmax(1) == theirs_p.argmax(1)).mean()),
        "max_abs_prob_diff": float(np.abs(ours_p - theirs_p).max()),
        "accuracy": float((ours_p.argmax(1) == labels[: len(chunk)]).mean()),
    }


# --------------------------------------------------------------------------- profiling

# Where the event loop's time goes: (label, frame function names, any of which counts).
PROFILE_PARTS = (
    ("JSON parse of the request body (`Request.json`, stdlib json)", ("Request.json",)),
    ("FastAPI dependency solving (`solve_dependencies`)", ("solve_dependencies",)),
    ("body validation (pydantic, `request_body_to_args`)", ("request_body_to_args",)),
    ("nested lists -> numpy (`v1_images`)", ("v1_images",)),
    ("response model (`_v1_response`) and serialization", ("_v1_response", "serialize_response")),
    ("micro-batcher task (`MicroBatcher.run`, incl. the thread hand-off)", ("MicroBatcher.run",)),
    ("hand-off to a thread (`ThreadPoolExecutor.submit`)", ("ThreadPoolExecutor.submit",)),
    ("run_in_threadpool (sync dependencies / endpoints)", ("run_in_threadpool",)),
    ("HTTP parsing (`HttpToolsProtocol.data_received`)", ("HttpToolsProtocol.data_received",)),
)


def profile(pid: int, seconds: float, out: Path) -> dict[str, Any]:
    """py-spy (all threads) on `pid` for `seconds`, summarised from its collapsed stacks."""
    spy = BIN / "py-spy"
    if not spy.is_file():
        return {"error": "py-spy not installed"}
    command = [
        str(spy), "record", "--pid", str(pid), "--duration", str(int(seconds)),
        "--rate", "250", "--format", "raw", "--output", str(out), "--nonblocking",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0 or not out.is_file():
        return {"error": (done.stderr or done.stdout)[-800:]}
    threads: Counter[str] = Counter()
    main_leaf: Counter[str] = Counter()
    main_inclusive: Counter[str] = Counter()
    total = main_total = 0
    for line in out.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        # Worker threads start in Thread._bootstrap; the rest is the main thread (py-spy
        # sometimes cuts a deep stack short, so its root is not always runpy's).
        is_main = not frames[0].startswith("Thread._bootstrap")
        threads["event loop (main thread)" if is_main else "other threads"] += count
        if not is_main:
            continue
        main_total += count
        main_leaf[_short(frames[-1])] += count
        for name in {_function(frame) for frame in frames}:
            main_inclusive[name] += count
    if not main_total:
        return {"error": "no samples of the main thread"}

    def pct(count: int, of: int) -> float:
        return round(100 * count / of, 1)

    # uvicorn runs uvloop: with no Python frame above `Runner.run`, the thread is waiting for
    # I/O or busy in uvloop's C code.
    parts = [
        (
            "event loop waiting for I/O or in uvloop's C code (no Python frame above it)",
            pct(main_leaf["Runner.run (runners.py)"], main_total),
        )
    ] + [
        (label, pct(max(main_inclusive[name] for name in names), main_total))
        for label, names in PROFILE_PARTS
    ]
    return {
        "samples": total,
        "threads_pct": [(name, pct(c, total)) for name, c in threads.most_common()],
        "main_parts_pct": parts,
        "main_leaf_pct": [(name, pct(c, main_total)) for name, c in main_leaf.most_common(12)],
    }


def _function(frame: str) -> str:
    return frame.partition(" (")[0]


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    match = re.match(r"^(?P<fn>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$", frame)
    if not match:
        return frame
    return f"{match['fn']} ({Path(match['file']).name})"


@contextlib.contextmanager
def profiled(server: Server, seconds: float, out: Path, into: dict[str, Any]) -> Iterator[None]:
    """py-spy on `server` while the block runs (it starts `delay` s in, for `seconds`)."""
    assert server.process is not None
    pid = server.process.pid

    def run() -> None:
        into.update(profile(pid, seconds, out))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(timeout=seconds + 90)


# --------------------------------------------------------------------------- report


def _fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:,.{digits}f}"


def evaluate_targets(results: list[Result], ours: list[str]) -> list[dict[str, Any]]:
    def find(server: str, scenario: str) -> Result | None:
        return next((r for r in results if r.server == server and r.scenario == scenario), None)

    found: list[dict[str, Any]] = []
    theirs16 = find("mlflow", "single c=16")
    for name in ours:
        ours16 = find(name, "single c=16")
        if ours16 and theirs16 and theirs16.req_per_s > 0:
            ratio = ours16.req_per_s / theirs16.req_per_s
            efficiency = ours16.req_per_server_cpu_s / theirs16.req_per_server_cpu_s
            found.append(
                {
                    "server": name,
                    "target": f"throughput >= {TARGET_RATIO:g}x mlflow (single images, "
                    "concurrency 16)",
                    "measured": f"{ours16.req_per_s:,.0f} vs {theirs16.req_per_s:,.0f} req/s "
                    f"= {ratio:.2f}x (server CPU {ours16.server_cpu_pct:.0f}% vs "
                    f"{theirs16.server_cpu_pct:.0f}%, client CPU {ours16.client_cpu_pct:.0f}%; "
                    f"per server CPU-second {efficiency:.2f}x)",
                    "value": ratio,
                    "per_server_cpu_ratio": efficiency,
                    "holds": ratio >= TARGET_RATIO,
                }
            )
        opened = next((r for r in results if r.server == name and r.mode == "open"), None)
        if opened and opened.target_rate:
            sustained = opened.req_per_s >= 0.97 * opened.target_rate and opened.errors == 0
            found.append(
                {
                    "server": name,
                    "target": f"p99 <= {TARGET_P99_MS:g} ms at {opened.target_rate:g} req/s "
                    "(single images, open loop; rate sustained, no errors)",
                    "measured": f"p99 {opened.p99_ms:.2f} ms, p50 {opened.p50_ms:.2f} ms, "
                    f"{opened.req_per_s:.1f} req/s, {opened.errors} errors",
                    "value": opened.p99_ms,
                    "holds": opened.p99_ms <= TARGET_P99_MS and sustained,
                }
            )
    return found


def markdown(report: dict[str, Any]) -> str:
    env, config = report["environment"], report["config"]
    agreement = report["agreement"]
    variants = "; ".join(
        f"`{name}`: {', '.join(f'{k}={v}' for k, v in settings.items()) or 'defaults'} ("
        + ", ".join(f"{k} {v}" for k, v in report["our_effective_settings"][name].items())
        + ")"
        for name, settings in report["our_variants"].items()
    )
    lines = [
        "# Serving benchmark: this service vs `mlflow models serve`",
        "",
        f"Run {report['started']} by `bench/serving.py` on {env['machine']}, "
        f"{env['cpus']} CPUs, Python {env['python']}. Both servers serve the same registered "
        f"model (`{report['model_uri']}`, version {report['model_version']}, a small CNN, "
        f"test accuracy {report['model_accuracy']}) and get the same images.",
        "",
        f"- **Load generator**: one process, asyncio + `aiohttp`, HTTP/1.1 keep-alive "
        f"on loopback; a closed loop of c workers shares a pool of c connections, the open "
        f"loop one of {OPEN_LOOP_CONNECTIONS}. It shares this {env['cpus']}-CPU machine with the "
        f"servers: {env['pinning']} The `client CPU` column shows how busy it was (near "
        "100%: the client, not the server, was the limit). Its garbage collector is off while "
        "it measures (a full collection of its torch/MLflow objects would stall it ~0.3 s).",
        f"- **Ours**: `python -m pipeline serve` (one uvicorn worker, micro-batching, ONNX "
        f"Runtime). Variants: {variants}.",
        "- **mlflow**: `mlflow models serve --env-manager local -w 1` (one uvicorn worker, "
        "the PyTorch pyfunc).",
        f"- **Closed loop**: {config['warmup_s']:g} s warm-up, then {config['duration_s']:g} s "
        f"measured. **Open loop**: {config['rate']:g} requests/s at fixed times for "
        f"{config['rate_duration_s']:g} s after a {config['warmup_s']:g} s warm-up; latency "
        "from the scheduled send time. CPU columns, in % of one CPU: the server's process "
        "tree, the load generator, and everything else on the machine (`other`: near 0 in "
        "an undisturbed run).",
        f"- Agreement: on {agreement['images']} test images the two servers give the same digit "
        f"for {agreement['digits_agree']:.1%} (max probability difference "
        f"{agreement['max_abs_prob_diff']:.1e}); accuracy {agreement['accuracy']:.1%}.",
        "",
        "| server | scenario | req/s | images/s | p50 ms | p90 ms | p99 ms | max ms "
        "| server CPU | req per server CPU-s | client CPU | other CPU | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for row in report["results"]:
        lines.append(
            f"| {row['server']} | {row['scenario']} | {_fmt(row['req_per_s'])} | "
            f"{_fmt(row['images_per_s'], 0)} | {_fmt(row['p50_ms'], 2)} | "
            f"{_fmt(row['p90_ms'], 2)} | {_fmt(row['p99_ms'], 2)} | {_fmt(row['max_ms'], 1)} | "
            f"{_fmt(row['server_cpu_pct'], 0)}% | {_fmt(row['req_per_server_cpu_s'], 0)} | "
            f"{_fmt(row['client_cpu_pct'], 0)}% | {_fmt(row['other_cpu_pct'], 0)}% | "
            f"{row['errors']} |"
        )
    lines += ["", "## Targets", ""]
    for target in report["targets"]:
        mark = "PASS" if target["holds"] else "MISS"
        lines.append(f"- **{mark}** `{target['server']}`, {target['target']}: {target['measured']}")
    prof = report.get("profile") or {}
    if prof:
        lines += ["", "## Where our server's time goes (py-spy)", ""]
        if "error" in prof:
            lines.append(f"py-spy failed: `{prof['error']}`")
        else:
            threads = ", ".join(f"{name} {share}%" for name, share in prof["threads_pct"])
            lines += [
                f"`{prof['server']}`, {prof['scenario']}: {prof['samples']} samples at 250 Hz "
                f"over all threads ({threads}; a waiting thread counts as samples too).",
                "",
                "Share of the event loop thread's samples spent in (inclusive: a part counts "
                "while its frame is anywhere on the stack, so parts overlap; a garbage "
                "collection counts in the frame that triggered it):",
                "",
            ]
            lines += [f"- {share}% {label}" for label, share in prof["main_parts_pct"]]
            lines += ["", "Hottest frames on the event loop thread (self time):", ""]
            lines += [f"- {share}% `{name}`" for name, share in prof["main_leaf_pct"]]
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def auto_notes(results: list[Result]) -> list[str]:
    notes = []
    for row in results:
        if row.other_cpu_pct >= DISTURBED_PCT:
            notes.append(
                f"{row.server} {row.scenario}: other processes on the machine used "
                f"{row.other_cpu_pct:.0f}% of a CPU during the run: this row is disturbed."
            )
        if row.client_cpu_pct >= 90:
            notes.append(
                f"{row.server} {row.scenario}: the load generator used {row.client_cpu_pct:.0f}% "
                "of its CPU, so this row measures the client at least as much as the server."
            )
        if row.errors:
            notes.append(f"{row.server} {row.scenario}: errors {row.error_kinds}")
    return notes


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tracking-uri", help="an existing MLflow store (else: train a model)")
    parser.add_argument(
        "--model-uri", help="models:/<name>@<alias> or models:/<name>/<version> in that store"
    )
    parser.add_argument("--workdir", type=Path, help="keep data, store, logs here (else: temp)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per closed loop")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--concurrency", default="1,16,64", help="single-image closed loops")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batch-concurrency", default="1,4")
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop requests/s")
    parser.add_argument("--rate-duration", type=float, default=15.0)
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (new model)")
    parser.add_argument("--train-limit", type=int, default=20000)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument(
        "--variant",
        action="append",
        metavar="SERVING_KEY=VALUE",
        help="settings of a second variant of our service (repeatable; default: "
        "SERVING_BATCH_MAX_WAIT_MS 0.5, or 2 where 0.5 is the default); --variant none: "
        "no second variant",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the load generator to CPU 0 and the servers to the other CPUs",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    return parser.parse_args(argv)


def _variant(items: list[str] | None) -> dict[str, str]:
    if items == ["none"]:
        return {}
    if not items:
        default = effective_settings({})["batch_max_wait_ms"]
        wait = WAITS_MS[1] if default == WAITS_MS[0] else WAITS_MS[0]
        return {"SERVING_BATCH_MAX_WAIT_MS": f"{wait:g}"}
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("SERVING_"):
            raise SystemExit(f"--variant expects SERVING_KEY=VALUE, got {item!r}")
        settings[key] = value
    return settings


def variant_name(settings: dict[str, str]) -> str:
    """`ours` plus what differs, e.g. `ours batch_max_wait_ms=2`."""
    changes = ",".join(f"{k.removeprefix('SERVING_').lower()}={v}" for k, v in settings.items())
    return f"ours {changes}" if changes else "ours"


def effective_settings(overrides: dict[str, str]) -> dict[str, Any]:
    """The batching and inference settings a variant runs with: the service's defaults (as
    they are in services/serving/settings.py now) under `overrides` (SERVING_* variables)."""
    from services.serving.settings import ServingSettings

    fields = ServingSettings.model_fields
    chosen = {}
    for name in ("batch_max_wait_ms", "batch_max_images", "inference_threads"):
        raw = overrides.get(f"SERVING_{name.upper()}")
        default = fields[name].default
        chosen[name] = default if raw is None else type(default)(raw)
    return chosen


def _cpu_plan(no_pin: bool) -> tuple[set[int] | None, set[int] | None, str]:
    cpus = sorted(os.sched_getaffinity(0))
    if no_pin or len(cpus) < 2:
        return None, None, "not pinned: client and server compete for the same CPUs."
    client, servers = {cpus[0]}, set(cpus[1:])
    return (
        client,
        servers,
        f"pinned, the load generator to CPU {cpus[0]}, every server to CPU(s) "
        f"{', '.join(map(str, sorted(servers)))} (only the one under test is busy).",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, workdir = common.begin("serving", args.workdir)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    batch_concurrencies = [int(c) for c in args.batch_concurrency.split(",") if c]
    variant = _variant(args.variant)
    client_cpus, server_cpus, pinning = _cpu_plan(args.no_pin)
    print(f"[bench] workdir {workdir}", flush=True)

    params = prepare_data(workdir / "data", args.train_limit, args.test_limit, args.epochs)
    from mlflow.tracking import MlflowClient

    from pipeline.data.prepared import open_prepared

    test = open_prepared(Path(params.paths.prepared)).load("test")
    images = test.images.astype(np.float32) / 255.0
    if args.tracking_uri:
        tracking_uri = args.tracking_uri
        model_uri = args.model_uri or f"models:/{params.mlflow.registered_model}@champion"
    else:
        print("[bench] training and registering a small CNN", flush=True)
        tracking_uri, model_uri = train_and_register(params, workdir)
    match = MODEL_URI.match(model_uri)
    if not match:
        raise SystemExit(f"model URI {model_uri!r}: expected models:/<name>@<alias>")
    registry = MlflowClient(tracking_uri)
    version = (
        registry.get_model_version(match["name"], match["version"])
        if match["version"]
        else registry.get_model_version_by_alias(match["name"], match["alias"])
    )

    # The servers find the store through MLFLOW_TRACKING_URI, and uvicorn on PATH (mlflow).
    base_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SERVING_", "MLFLOW_"))
    } | {
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    variants: dict[str, dict[str, str]] = {"ours": {}}
    if variant and effective_settings(variant) != effective_settings({}):
        variants[variant_name(variant)] = variant
    elif variant:
        print(f"[bench] {variant} are the service's defaults: no second variant", flush=True)
    servers: list[Server] = []
    for name, settings in variants.items():
        port = free_port()
        servers.append(
            Server(
                name=name,
                kind="ours",
                command=[sys.executable, "-m", "pipeline", "serve", "--port", str(port)],
                env=base_env
                | {"SERVING_MODEL_URI": model_uri, "SERVING_CACHE_DIR": str(workdir / "cache")}
                | settings,
                ready_url=f"http://127.0.0.1:{port}/health/ready",
                predict_url=f"http://127.0.0.1:{port}/v1/predict",
                log=workdir / (re.sub(r"[^\w.-]+", "_", name) + ".log"),
                cpus=server_cpus,
                fail_marker="model refresh failed",
            )
        )
    port = free_port()
    mlflow_command = [
        str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
        "-h", "127.0.0.1", "-p", str(port), "-w", "1",
    ]  # fmt: skip
    servers.append(
        Server(
            name="mlflow",
            kind="mlflow",
            command=mlflow_command,
            env=base_env,
            ready_url=f"http://127.0.0.1:{port}/ping",
            predict_url=f"http://127.0.0.1:{port}/invocations",
            log=workdir / "mlflow.log",
            cpus=server_cpus,
        )
    )

    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    results: list[Result] = []
    prof: dict[str, Any] = {}
    try:
        ready: dict[str, float] = {}
        for server in servers:  # one at a time: the first one fills the ONNX cache
            server.start()
            ready[server.name] = round(server.wait_ready(args.ready_timeout), 1)
        print(f"[bench] ready after (s) {ready}", flush=True)
        agreement = check_agreement(
            servers[0].predict_url, servers[-1].predict_url, images, test.labels
        )
        bodies = payloads(images, args.batch_size)
        for server in servers:
            kind = bodies[server.kind]
            for c in concurrencies:
                scenario = f"single c={c}"
                if server.name == "ours" and c == 16 and not args.no_profile:
                    seconds = max(1.0, args.duration - 2)
                    out = workdir / "ours.pyspy.txt"
                    with profiled(server, seconds, out, prof):
                        results.append(measure(server, scenario, 1, kind["single"], args))
                    prof |= {"server": server.name, "scenario": f"{scenario}, {seconds:g} s"}
                else:
                    results.append(measure(server, scenario, 1, kind["single"], args))
            for c in batch_concurrencies:
                scenario = f"batch {args.batch_size} c={c}"
                results.append(measure(server, scenario, args.batch_size, kind["batch"], args))
            scenario = f"open {args.rate:g} req/s"
            results.append(measure(server, scenario, 1, kind["single"], args))
    finally:
        for server in servers:
            server.stop()

    report: dict[str, Any] = {
        "started": started,
        "environment": {
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "pinning": pinning,
        },
        "model_uri": model_uri,
        "model_version": str(version.version),
        "model_accuracy": f"{float(version.tags.get('test_accuracy', 'nan')):.2%}",
        "tracking_uri": tracking_uri,
        "our_variants": variants,
        "our_effective_settings": {name: effective_settings(v) for name, v in variants.items()},
        "config": {
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "rate": args.rate,
            "rate_duration_s": args.rate_duration,
            "batch_size": args.batch_size,
            "concurrency": concurrencies,
            "batch_concurrency": batch_concurrencies,
        },
        "ready_s": ready,
        "agreement": agreement,
        "results": [asdict(r) for r in results],
        "targets": evaluate_targets(results, list(variants)),
        "profile": prof,
        "notes": auto_notes(results),
    }
    text = markdown(report)
    common.write_results("serving", report, text, args.out_dir)
    common.finish(workdir, bool(args.workdir), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
