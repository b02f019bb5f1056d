"""What the benchmarks share: machine record, CPU accounting, data, fresh-process training."""

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path
from typing import Any, Self

import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DISTURBED_PCT = 15.0  # other processes' CPU use (% of one CPU) that makes a row suspect
DISTURBED = "{}: other processes used {:.0f}% of a CPU (the row is disturbed)"


def environment() -> dict[str, Any]:
    import torch

    from pipeline.tracking.lineage import git_commit

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":")[1].strip() for line in cpuinfo if line.startswith("model name")]
    with contextlib.chdir(REPO):
        commit = git_commit()
    env: dict[str, Any] = {"cpu": models[0] if models else "unknown", "cpus": os.cpu_count()}
    env |= {"memory_gib": round(psutil.virtual_memory().total / 2**30, 1)}
    env |= {"python": sys.version.split()[0], "torch_threads": torch.get_num_threads()}
    env["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    env["versions"] = {name: version(name) for name in ("torch", "lightning", "ray", "mlflow")}
    env["commit"] = "commit " + commit[:10] + commit[40:]  # short, and -dirty
    return env | {"load": ", ".join(f"{x:.2f}" for x in os.getloadavg())}


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all CPUs, not idle or waiting on I/O)."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


class CpuMeter:
    """A process tree's CPU seconds until `stop()`, sampled every `sample_s` (exits count)."""

    def __init__(self, pid: int | None = None, sample_s: float | None = None) -> None:
        self.root, self.seen = psutil.Process(pid), dict[tuple[int, float], list[float]]()
        self._note(born=False)
        self.wall_s, self.busy_s, self.own_s = time.perf_counter(), busy_cpu_s(), 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, args=(sample_s,), daemon=True)
        if sample_s:
            self.thread.start()

    def _note(self, born: bool) -> None:
        """Each process's CPU seconds: [at the start (0 if `born` since), last seen]."""
        with contextlib.suppress(psutil.Error):  # one gone meanwhile: the next note goes on
            for proc in [self.root, *self.root.children(recursive=True)]:
                times, key = proc.cpu_times(), (proc.pid, proc.create_time())
                now = times.user + times.system
                self.seen.setdefault(key, [0.0 if born else now, now])[1] = now

    def _sample(self, every_s: float) -> None:  # in the thread
        while not self.done.wait(every_s):
            self._note(born=True)

    def stop(self) -> Self:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()
        self._note(born=True)
        self.wall_s, self.busy_s = time.perf_counter() - self.wall_s, busy_cpu_s() - self.busy_s
        self.own_s = sum(last - first for first, last in self.seen.values())
        return self

    @property
    def other_pct(self) -> float:  # what everything else used, % of one CPU
        return max(0.0, 100 * (self.busy_s - self.own_s) / self.wall_s)


def disturbed(rows: Iterable[dict[str, Any]], *names: str) -> list[str]:
    busy = (r for r in rows if r["other_cpu_pct"] >= DISTURBED_PCT)
    return [DISTURBED.format(" ".join(str(r[n]) for n in names), r["other_cpu_pct"]) for r in busy]


def gemm_flops(size: int = 2048, seconds: float = 2.0) -> float:
    import torch

    a, b, out = torch.randn(size, size), torch.randn(size, size), torch.empty(size, size)
    torch.mm(a, b, out=out)  # warm-up: MKL's buffers, the threads
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def scratch_params(root: Path, overrides: dict[str, Any], prepared: Path | None = None) -> Any:
    from testkit.data import params_under

    where = {} if prepared is None else {"paths.prepared": str(prepared)}
    return params_under(root, where | overrides, "benchmark params")


def prepared_data(root: Path, train_limit: int | None) -> Path:
    from testkit.data import fetch_and_prepare

    limits = {"prepare.train_limit": train_limit, "prepare.test_limit": None}
    if train_limit:
        limits["prepare.val_size"] = max(200, train_limit // 10)
    params = scratch_params(root, limits)
    fetch_and_prepare(params)
    return Path(params.paths.prepared)


def train_fresh(params: Any, model: str, folder: Path, name: str, evaluate: bool = False) -> Any:
    """`train_model` in a fresh process (`bench.train_run`): its result, a CpuMeter of its tree."""
    from pipeline.tracking.runs import ensure_experiment

    folder.mkdir(parents=True, exist_ok=True)
    job, log, uri = folder / f"{name}.json", folder / f"{name}.log", f"sqlite:///{folder}/mlflow.db"
    ensure_experiment(uri, params.mlflow.experiment)  # a new store migrates its schema once
    spec = {"params": params.model_dump(mode="json"), "model": model, "uri": uri, "name": name}
    job.write_text(json.dumps(spec | {"evaluate": evaluate}))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with log.open("wb") as sink:
        meter = CpuMeter(sample_s=0.25)
        command = [sys.executable, "-m", "bench.train_run", str(job)]
        done = subprocess.run(command, cwd=folder, env=env, stdout=sink, stderr=sink)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed ({log}):\n{log.read_text()[-4000:]}")
    return json.loads(job.with_suffix(".out.json").read_text()), meter.stop()


def parser(doc: str | None) -> argparse.ArgumentParser:
    found = argparse.ArgumentParser(description=doc)
    found.add_argument("--workdir", type=Path, help="keep data, stores, logs here (else: temp)")
    found.add_argument("--out-dir", type=Path, default=RESULTS, help="for the results files")
    return found


def begin(kind: str, args: argparse.Namespace, argv: list[str] | None) -> Any:
    """Report (time, arguments, environment) and work folder; SIGTERM/SIGHUP run the `finally`s."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
    folder = args.workdir or Path(tempfile.mkdtemp(prefix=f"bench-{kind}-"))
    folder.mkdir(parents=True, exist_ok=True)
    log(f"workdir {folder}")
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "environment": environment()}
    return report | {"argv": sys.argv[1:] if argv is None else argv}, folder


def finish(args: argparse.Namespace, workdir: Path) -> None:
    if not args.workdir:  # not named by the user
        shutil.rmtree(workdir, ignore_errors=True)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)
