"""What the training, pipeline and accuracy benchmarks share: the machine's record, the CPU
other processes took while we measured, the float32 GEMM ceiling, data and params in a
scratch folder, and the results files.

Not a benchmark itself; `bench/training.py`, `bench/pipeline.py` and `bench/accuracy.py`
import it (they put `bench/` and the repo on `sys.path`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
# The repo first: `python bench/x.py` from anywhere imports the project, and the project's
# `pipeline` package wins over this folder's `pipeline.py` (the script's folder is on the path).
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
DISTURBED_PCT = 15.0  # other processes' CPU use (% of one CPU) that makes a row suspect


# --------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}-dirty" if dirty else head


def busy_processes(limit: int = 5) -> list[str]:
    """The busiest other processes right now (name and % of one CPU over 0.5 s): what the
    `other CPU` column was, when a row is disturbed."""
    own = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    procs = [p for p in psutil.process_iter(["name", "cmdline"]) if p.pid not in own]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.cpu_percent(None)
    time.sleep(0.5)
    busy: list[tuple[float, str]] = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            pct = proc.cpu_percent(None)
            if pct >= 5:
                cmd = " ".join(proc.info["cmdline"] or [proc.info["name"] or "?"])
                busy.append((pct, f"{pct:.0f}% {cmd[:90]}"))
    return [text for _, text in sorted(busy, reverse=True)[:limit]]


def environment() -> dict[str, Any]:
    import torch

    versions = {}
    for name in ("torch", "lightning", "ray", "mlflow", "dvc", "numpy"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[name] = version(name)
    return {
        "machine": platform.platform(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "versions": versions,
        "git_commit": git_commit(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "busy_processes_at_start": busy_processes(),
    }


# --------------------------------------------------------------------------- CPU accounting


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all CPUs, not idle or waiting on I/O)."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


@dataclass
class CpuShare:
    """Wall time of a block, and the CPU that this process tree and everything else used."""

    wall_s: float = 0.0
    own_cpu_s: float = 0.0
    other_cpu_s: float = 0.0

    @property
    def own_pct(self) -> float:  # of one CPU
        return 100 * self.own_cpu_s / self.wall_s if self.wall_s else float("nan")

    @property
    def other_pct(self) -> float:  # of one CPU
        return max(0.0, 100 * self.other_cpu_s / self.wall_s) if self.wall_s else float("nan")


@dataclass
class _TreeSampler:
    """CPU time of this process and all its descendants (a local Ray's raylet, workers and
    actors are descendants of the driver that started it), sampled every `interval_s` so that
    processes that exit before the block ends (Ray workers) still count."""

    interval_s: float = 0.25
    seen: dict[tuple[int, float], tuple[float, float]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        root = psutil.Process()
        with contextlib.suppress(psutil.Error):
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    key = (proc.pid, proc.create_time())
                    now = times.user + times.system
                    # Born during the block: all its CPU time is the block's.
                    first = self.seen.get(key, (0.0, now))[0]
                    self.seen[key] = (first, now)

    def run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def used_s(self) -> float:
        return sum(last - first for first, last in self.seen.values())


class CpuMeter:
    """The cheap form, for work inside this process: its CPU (all threads) against the
    machine's busy time, from creation to `stop()`."""

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._busy = _busy_cpu_s()
        self._own = time.process_time()

    def stop(self) -> CpuShare:
        own = time.process_time() - self._own
        return CpuShare(
            wall_s=time.perf_counter() - self._wall,
            own_cpu_s=own,
            other_cpu_s=_busy_cpu_s() - self._busy - own,
        )


@contextlib.contextmanager
def cpu_share() -> Iterator[CpuShare]:
    """Measure a block: its wall time, this process tree's CPU and the rest of the machine's
    (busy CPU time minus ours; near 0 when nothing else runs)."""
    share = CpuShare()
    sampler = _TreeSampler()
    # Processes alive at the start count from their CPU time then; later ones from zero.
    root = psutil.Process()
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            now = times.user + times.system
            sampler.seen[(proc.pid, proc.create_time())] = (now, now)
    thread = threading.Thread(target=sampler.run, name="bench-cpu-sampler", daemon=True)
    machine_before, started = _busy_cpu_s(), time.perf_counter()
    thread.start()
    try:
        yield share
    finally:
        sampler._stop.set()
        thread.join()
        sampler.sample()
        share.wall_s = time.perf_counter() - started
        share.own_cpu_s = sampler.used_s()
        share.other_cpu_s = _busy_cpu_s() - machine_before - share.own_cpu_s


# --------------------------------------------------------------------------- the ceiling


def gemm_flops(threads: int | None = None, size: int = 2048, seconds: float = 2.0) -> float:
    """Float32 matrix-multiply FLOP/s of torch on `threads` threads (default: torch's), the
    best of repeated `size`-square products for about `seconds`: what the machine's BLAS
    reaches, the ceiling a training run's FLOP/s are compared to. The best, not the mean: a
    burst of foreign load can only lower a repetition."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        out = torch.empty(size, size)
        torch.mm(a, b, out=out)  # warm-up: MKL's buffers, the threads
        best = float("inf")
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - start)
        return 2 * size**3 / best
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- data and params


def mirror_folder() -> str:
    from testkit.data import mirror_folder as folder

    return str(folder())


def repo_params_raw() -> dict[str, Any]:
    from testkit.data import raw_params

    return raw_params()


def scratch_params(root: Path, overrides: dict[str, Any], prepared: Path | None = None) -> Any:
    """The repo's params with every output path under `root` (and the prepared data at
    `prepared` when given), then `overrides`; validated like every command does."""
    from testkit.data import params_under

    where = {} if prepared is None else {"paths.prepared": str(prepared)}
    return params_under(root, where | overrides, "benchmark params")


def prepared_data(root: Path, train_limit: int | None, test_limit: int | None = None) -> Path:
    """A prepared data folder: the repo's `data/prepared` when it is there and the full data
    is asked for (read only), else the pipeline's own fetch and prepare stages into `root`."""
    from pipeline.data.prepared import open_prepared
    from testkit.data import fetch_and_prepare

    repo_prepared = REPO / "data" / "prepared"
    if train_limit is None and test_limit is None and (repo_prepared / "manifest.json").is_file():
        with contextlib.suppress(Exception):
            data = open_prepared(repo_prepared)
            defaults = scratch_params(root, {})
            if data.sizes.get("val") == defaults.prepare.val_size:
                return repo_prepared
    overrides: dict[str, Any] = {"prepare.train_limit": train_limit, "prepare.test_limit": None}
    if test_limit is not None:
        overrides["prepare.test_limit"] = test_limit
    if train_limit is not None:
        overrides["prepare.val_size"] = max(200, train_limit // 10)
    params = scratch_params(root, overrides)
    if not (Path(params.paths.prepared) / "manifest.json").is_file():
        fetch_and_prepare(params)
    return Path(params.paths.prepared)


def init_store(uri: str, experiment: str) -> None:
    """Create the MLflow store and experiment before a measured run: a new SQLite store's
    schema migrations take seconds once, which a user's existing store does not pay."""
    from pipeline.tracking.runs import ensure_experiment

    ensure_experiment(uri, experiment)


# --------------------------------------------------------------------------- output


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through `finally`: what the run started stops


def begin(kind: str, workdir: Path | None) -> tuple[str, Path]:
    """A benchmark's start: SIGTERM and SIGHUP end it through its `finally` blocks; returns
    the start time and its work folder (`workdir`, else a new temporary one)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    folder = workdir or Path(tempfile.mkdtemp(prefix=f"bench-{kind}-"))
    folder.mkdir(parents=True, exist_ok=True)
    return time.strftime("%Y-%m-%d %H:%M:%S %Z"), folder


def finish(workdir: Path, keep: bool, markdown: str) -> None:
    """Print the report; remove the work folder unless the user named it (`keep`)."""
    print(markdown)
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)


def write_results(name: str, report: dict[str, Any], markdown: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(markdown)
    print(f"[bench] wrote {out_dir / name}.json and .md", flush=True)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)
