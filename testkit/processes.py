"""Server processes on loopback, and a fresh-clone copy of the repo."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from testkit.data import REPO


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that points a child elsewhere (Ray's,
    MLflow's and S3 settings), the venv's tools first on PATH, plus `extra`."""
    prefixes = ("RAY_", "MLFLOW_", "AWS_", "S3_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    return env | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"} | extra


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else ""


def wait_for_http(
    url: str,
    process: subprocess.Popen[bytes],
    log: Path,
    timeout_s: float = 90,
    fail_marker: str | None = None,
) -> float:
    """Poll `url` until it answers 200 and return the seconds it took; raise with the log's
    tail if the process dies, logs `fail_marker` (it will never be ready) or times out."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{_tail(log)}")
        if fail_marker and fail_marker in _tail(log, 20000):
            raise RuntimeError(f"server cannot start ({fail_marker!r}):\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s:\n{_tail(log)}")


@contextmanager
def running(
    command: list[str],
    url: str,
    log: Path,
    env: dict[str, str] | None = None,
    timeout_s: float = 90,
    *,
    fail_marker: str | None = None,
    cpus: set[int] | None = None,
    group: bool = False,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server process for the block (given to it, e.g. for its pid), once `url`
    answers; stop it afterwards. `cpus`: pinned to them (what it starts inherits it);
    `group`: in its own process group, all of which is stopped (SIGTERM, SIGKILL after 20 s)."""

    def pin() -> None:  # in the child, before exec
        if cpus:
            os.sched_setaffinity(0, cpus)

    with log.open("wb") as sink:
        process = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=group,
            preexec_fn=pin if cpus else None,
        )
        try:
            wait_for_http(url, process, log, timeout_s, fail_marker)
            yield process
        finally:
            (_stop_group if group else _stop)(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group, SIGKILL if any of it is left after 20 s."""
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        with suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            process.poll()
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def copy_repo(target: Path) -> None:
    """The tracked files and the untracked ones git does not ignore (what a fresh clone has,
    plus work in progress), as a new git repo."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
