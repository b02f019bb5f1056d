"""The deployed stack as processes on loopback, started by the same entrypoints Compose runs:
PostgreSQL (Debian's server), SeaweedFS's S3 gateway (`infra/s3/entrypoint.sh`), its buckets
(`infra/s3/create_buckets.py`), MLflow with basic auth (`infra/mlflow/entrypoint.sh`) and its
users (`infra/mlflow/create_users.py`). Each server can be stopped and started again, for the
fault tests; every one is stopped when its block ends, whatever happened in it.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from testkit.data import REPO
from testkit.processes import clean_env, free_port

BUCKETS = ("mlflow-artifacts", "mnist-dvc")


def _port_pair() -> int:
    """A free port p with p + 10000 free too: SeaweedFS puts each gRPC port there."""
    while True:
        port = random.randint(20000, 50000)
        with socket.socket() as one, socket.socket() as two:
            try:
                one.bind(("127.0.0.1", port))
                two.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def _pg(tool: str) -> str:
    """A PostgreSQL server program: Debian's, the newest major version (.ci/run installs it)."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if not versions:
        raise RuntimeError("no PostgreSQL server here: apt-get install postgresql")
    return str(versions[-1] / tool)


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else ""


def _wait(
    ready: object, what: str, log: Path, process: subprocess.Popen[bytes] | None, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{_tail(log)}")
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready within {timeout_s:.0f} s:\n{_tail(log)}")


@dataclass
class Server:
    """One server process in its own session: `stop` ends its whole group."""

    name: str
    command: list[str]
    env: dict[str, str]
    log: Path
    ready_url: str
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120) -> None:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                self.command,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        _wait(self.answers, self.name, self.log, self.process, timeout_s)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.ready_url, timeout=2) as reply:
                return bool(reply.status < 500)
        except urllib.error.HTTPError as error:  # S3 answers 403 to an unsigned request
            return error.code < 500
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, sig)
        try:
            # Scratch servers: a short grace, then the whole group goes (nothing of theirs
            # outlives the test session).
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@dataclass
class Postgres:
    """A PostgreSQL cluster in a scratch folder of its own under the system's temp folder, owned
    by the `postgres` user when we are root: the server refuses to run as root, and a test's
    temporary folder (mode 700) is closed to other users."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="mnist-postgres-")))
    port: int = field(default_factory=free_port)
    user: str = "mnist"
    password: str = field(default_factory=lambda: secrets.token_hex(12))

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, cwd=self.root)

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def init(self, databases: tuple[str, ...]) -> None:
        (self.root / "pw").write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.root / "pw", "postgres")
        self._run(
            _pg("initdb"),
            "-D",
            str(self.root / "data"),
            "-U",
            self.user,
            "--auth=scram-sha-256",
            f"--pwfile={self.root / 'pw'}",
            "-E",
            "UTF8",
        )
        self.start()
        for database in databases:
            self._sql(f"CREATE DATABASE {database}")

    def _sql(self, statement: str) -> None:
        env = os.environ | {"PGPASSWORD": self.password}
        subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                statement,
            ],
            check=True,
            capture_output=True,
            env=env,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run(
            _pg("pg_ctl"),
            "-D",
            str(self.root / "data"),
            "-l",
            str(self.root / "log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        if (self.root / "data" / "postmaster.pid").exists():
            self._run(_pg("pg_ctl"), "-D", str(self.root / "data"), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass(frozen=True)
class S3Keys:
    access_key: str
    secret_key: str


@dataclass
class S3:
    server: Server
    endpoint: str
    admin: S3Keys
    app: S3Keys

    def env(self, keys: S3Keys | None = None) -> dict[str, str]:
        """What a client of the stack gets: the app's keys and the endpoint."""
        keys = keys or self.app
        return {
            "AWS_ACCESS_KEY_ID": keys.access_key,
            "AWS_SECRET_ACCESS_KEY": keys.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self, keys: S3Keys | None = None):  # type: ignore[no-untyped-def]
        import boto3

        keys = keys or self.app
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=keys.access_key,
            aws_secret_access_key=keys.secret_key,
            region_name="us-east-1",
        )

    def sizes(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Each object's size under `prefix`, by key."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return {item["Key"]: item["Size"] for page in pages for item in page.get("Contents", [])}

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


def seaweedfs(root: Path) -> S3:
    """SeaweedFS's S3 gateway on free ports (not started yet)."""
    root.mkdir(parents=True, exist_ok=True)
    admin = S3Keys("stack-admin", secrets.token_hex(16))
    app = S3Keys("stack-app", secrets.token_hex(16))
    port = _port_pair()
    env = clean_env(
        S3_ADMIN_ACCESS_KEY=admin.access_key,
        S3_ADMIN_SECRET_KEY=admin.secret_key,
        S3_APP_ACCESS_KEY=app.access_key,
        S3_APP_SECRET_KEY=app.secret_key,
        S3_BUCKETS=",".join(BUCKETS),
        SEAWEEDFS_DIR=str(root / "data"),
        S3_HOST="127.0.0.1",
        S3_PORT=str(port),
        SEAWEEDFS_MASTER_PORT=str(_port_pair()),
        SEAWEEDFS_VOLUME_PORT=str(_port_pair()),
        SEAWEEDFS_FILER_PORT=str(_port_pair()),
    )
    endpoint = f"http://127.0.0.1:{port}"
    command = ["bash", str(REPO / "infra" / "s3" / "entrypoint.sh")]
    server = Server("SeaweedFS", command, env, root / "log", f"{endpoint}/")
    return S3(server, endpoint, admin, app)


def create_buckets(s3: S3) -> None:
    env = clean_env(
        AWS_ENDPOINT_URL=s3.endpoint,
        S3_ADMIN_ACCESS_KEY=s3.admin.access_key,
        S3_ADMIN_SECRET_KEY=s3.admin.secret_key,
        S3_BUCKETS=",".join(BUCKETS),
    )
    script = REPO / "infra" / "s3" / "create_buckets.py"
    subprocess.run([sys.executable, str(script)], env=env, check=True, capture_output=True)


@dataclass(frozen=True)
class Login:
    username: str
    password: str


@dataclass
class Mlflow:
    server: Server
    url: str
    admin: Login
    trainer: Login
    serving: Login

    def env(self, login: Login | None = None) -> dict[str, str]:
        """A client's MLflow settings: the server and a user (the trainer by default)."""
        login = login or self.trainer
        return {
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_TRACKING_USERNAME": login.username,
            "MLFLOW_TRACKING_PASSWORD": login.password,
        }

    @contextmanager
    def client(self, login: Login | None = None) -> Iterator[Any]:
        """An MlflowClient of this server, logged in (the admin by default) for the block."""
        from mlflow.tracking import MlflowClient

        with mock.patch.dict(os.environ, self.env(login or self.admin)):
            yield MlflowClient(self.url)


def mlflow_server(root: Path, postgres: Postgres, s3: S3) -> Mlflow:
    """MLflow through infra/mlflow/entrypoint.sh: basic auth, PostgreSQL stores, artifacts
    proxied to the S3 bucket (not started yet)."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    admin = Login("admin", secrets.token_hex(12))
    env = clean_env(
        MLFLOW_AUTH_ADMIN_PASSWORD=admin.password,
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
        MLFLOW_AUTH_DATABASE_URI=postgres.url("mlflow_auth"),
        MLFLOW_BACKEND_STORE_URI=postgres.url("mlflow"),
        MLFLOW_ARTIFACTS_DESTINATION=f"s3://{BUCKETS[0]}",
        MLFLOW_ALLOWED_HOSTS=f"127.0.0.1:{port},localhost:{port}",
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
        MLFLOW_AUTH_CONFIG_PATH=str(root / "basic_auth.ini"),
        MLFLOW_S3_ENDPOINT_URL=s3.endpoint,
        **s3.env(),
    )
    url = f"http://127.0.0.1:{port}"
    command = ["bash", str(REPO / "infra" / "mlflow" / "entrypoint.sh")]
    server = Server("MLflow", command, env, root / "log", f"{url}/health")
    trainer = Login("trainer", secrets.token_hex(12))
    serving = Login("serving", secrets.token_hex(12))
    return Mlflow(server, url, admin, trainer, serving)


def create_users(mlflow: Mlflow) -> None:
    env = clean_env(
        MLFLOW_TRACKING_URI=mlflow.url,
        MLFLOW_AUTH_ADMIN_USERNAME=mlflow.admin.username,
        MLFLOW_AUTH_ADMIN_PASSWORD=mlflow.admin.password,
        MLFLOW_TRAINER_USERNAME=mlflow.trainer.username,
        MLFLOW_TRAINER_PASSWORD=mlflow.trainer.password,
        MLFLOW_SERVING_USERNAME=mlflow.serving.username,
        MLFLOW_SERVING_PASSWORD=mlflow.serving.password,
    )
    script = REPO / "infra" / "mlflow" / "create_users.py"
    subprocess.run([sys.executable, str(script)], env=env, check=True, capture_output=True)


@dataclass
class Stack:
    postgres: Postgres
    s3: S3
    mlflow: Mlflow

    def env(self) -> dict[str, str]:
        """What a deployment gives the pipeline's processes: MLflow as the trainer, S3 keys."""
        return self.mlflow.env() | self.s3.env()


@contextmanager
def running_stack(root: Path) -> Iterator[Stack]:
    """PostgreSQL, SeaweedFS with the buckets, MLflow with its users, for the block."""
    postgres = Postgres()
    s3 = seaweedfs(root / "s3")
    stack: Stack | None = None
    try:
        postgres.init(("mlflow", "mlflow_auth"))
        s3.server.start()
        create_buckets(s3)
        mlflow = mlflow_server(root / "mlflow", postgres, s3)
        stack = Stack(postgres, s3, mlflow)
        mlflow.server.start(timeout_s=180)
        create_users(mlflow)
        yield stack
    finally:
        if stack is not None:
            stack.mlflow.server.stop()
        s3.server.stop(signal.SIGKILL)  # its clean stop takes seconds and keeps nothing we need
        postgres.remove()
