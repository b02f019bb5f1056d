"""A real Ray cluster on this machine: a head and a second node, token auth, each node in its
own session (one killpg stops it). The second node runs in its own mount namespace with a tmpfs
over one folder, which is then node-local for real (what the storage check is tested on).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from testkit.processes import clean_env, free_port

CAN_MASK = os.geteuid() == 0 and shutil.which("unshare") is not None
# Two nodes importing Ray on a busy 2-core machine can take minutes to answer a first driver.
START_DEADLINE_S = 240.0


@dataclass(frozen=True)
class Cluster:
    gcs: str  # host:port, for drivers
    dashboard: str  # the Jobs API
    token: str
    local_folder: Path  # hidden from the second node
    shared_folder: Path  # seen by both nodes


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        # Own session: the whole node (raylet, GCS, workers) stops with one killpg.
        return subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _alive_nodes(gcs: str, env: dict[str, str], timeout_s: float) -> int:
    """Alive nodes as a fresh driver sees them; 0 while the cluster cannot answer yet (a probe
    that hangs or fails counts as not started: the caller waits out its own deadline)."""
    probe = f"import ray; ray.init(address={gcs!r}); print(sum(n['Alive'] for n in ray.nodes()))"
    try:
        done = subprocess.run(
            [sys.executable, "-c", probe],
            env=env,
            capture_output=True,
            text=True,
            timeout=max(timeout_s, 1.0),
        )
    except subprocess.TimeoutExpired:
        return 0
    lines = done.stdout.strip().splitlines()
    return int(lines[-1]) if done.returncode == 0 and lines and lines[-1].isdigit() else 0


def _wait_for_nodes(
    count: int,
    gcs: str,
    env: dict[str, str],
    deadline: float,
    nodes: dict[Path, subprocess.Popen[bytes]],
) -> None:
    """Until `count` nodes are alive; at the deadline, or when a node process exits, fail with
    the nodes' logs."""
    while _alive_nodes(gcs, env, min(60.0, deadline - time.monotonic())) < count:
        exited = [log for log, process in nodes.items() if process.poll() is not None]
        if exited or time.monotonic() >= deadline:
            what = f"exited: {exited}" if exited else f"{count} nodes not alive in time"
            logs = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in nodes)
            raise RuntimeError(f"Ray cluster did not start ({what})\n{logs}")
        time.sleep(2)


def _agent_ports() -> list[str]:
    """Ports Ray otherwise takes fixed defaults for (52365, ...): another Ray on this machine
    (a test session's local one) would hold them, and this node's job agent would not start."""
    flags = [
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    ]
    return [part for flag in flags for part in (flag, str(free_port()))]


@contextmanager
def ray_cluster(root: Path, **node_env: str) -> Iterator[Cluster]:
    """Head (1 CPU) + a second node (1 CPU): a 2-worker run must span both. `node_env`: what
    a deployment gives the nodes (storage keys, the tracking server), which jobs inherit."""
    local, shared = root / "node-local", root / "shared"
    local.mkdir()
    shared.mkdir()
    token = secrets.token_hex(16)
    port, dashboard = free_port(), free_port()
    # Short: Ray's socket paths live under it and must fit the Unix limit.
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    # Its own: nodes sharing one would unpack job packages over each other's working dirs.
    node_temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")
    env = clean_env(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0", **node_env
    )
    head = _start(
        [
            "ray", "start", "--head", "--block",
            "--port", str(port),
            "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard),
            "--num-cpus", "1",
            "--temp-dir", temp_dir,
            "--ray-client-server-port", str(free_port()),
            *_agent_ports(),
            "--disable-usage-stats",
        ],
        root / "head.log",
        env,
    )  # fmt: skip
    gcs = f"127.0.0.1:{port}"
    join = " ".join(
        ["ray start --block --address", gcs, "--num-cpus 1 --temp-dir", node_temp_dir]
        + _agent_ports()
    )
    node_command = (
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs tmpfs {local} && exec {join}"]
        if CAN_MASK
        else ["sh", "-c", f"exec {join}"]
    )
    nodes = [head]
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        _wait_for_nodes(1, gcs, env, deadline, {root / "head.log": head})
        nodes.append(_start(node_command, root / "node.log", env))
        logs = {root / "head.log": head, root / "node.log": nodes[1]}
        _wait_for_nodes(2, gcs, env, deadline, logs)
        yield Cluster(gcs, f"http://127.0.0.1:{dashboard}", token, local, shared)
    finally:
        for process in reversed(nodes):
            _stop(process)
        for folder in (temp_dir, node_temp_dir):
            shutil.rmtree(folder, ignore_errors=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """`ray stop` would stop every Ray on the machine; this stops only this node."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    # A head's `ray start --block` can wait 30 s and more on its children; they hold nothing
    # a test needs, so a short grace is enough.
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)
    # Whatever outlived the orderly stop (a daemon whose parent died first).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
