"""Create (or re-password) the non-admin MLflow users `trainer` and `serving` (their variables:
infra/README.md); safe to rerun. A password that is empty, short, MLflow's old default or a
placeholder of the examples is refused (exit 64) before anything is created."""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from pathlib import Path

ROLES = ("TRAINER", "SERVING")
MIN_LENGTH = 12


def refuse(message: str) -> None:
    print(f"mlflow-users: refusing: {message}", file=sys.stderr)
    raise SystemExit(64)


def setting(name: str, default: str | None = None) -> str:
    """VAR, or the content of the file VAR_FILE names (Docker/Kubernetes secrets)."""
    file_name = os.environ.get(f"{name}_FILE")
    value = Path(file_name).read_text().rstrip("\r\n") if file_name else os.environ.get(name)
    value = value or default
    if not value:
        refuse(f"{name} is not set or is empty")
    assert value is not None
    return value


def password(name: str) -> str:
    value = setting(name)
    lowered = value.lower()
    if lowered == "password1234" or "change-me" in lowered or "changeme" in lowered:
        refuse(f"{name} is a known default or a placeholder of the examples; set a real secret")
    if len(value) < MIN_LENGTH:
        refuse(f"{name} is shorter than {MIN_LENGTH} characters")
    return value


def wait_until_up(uri: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError as error:
            if time.monotonic() > deadline:
                message = f"mlflow-users: {uri} did not answer in {timeout_s:.0f} s: {error}"
                raise SystemExit(message) from None
        time.sleep(2)


def main() -> None:
    uri = setting("MLFLOW_TRACKING_URI")
    users = {
        setting(f"MLFLOW_{role}_USERNAME"): password(f"MLFLOW_{role}_PASSWORD") for role in ROLES
    }
    # The client authenticates with MLflow's own variables: the admin, for this process only.
    os.environ["MLFLOW_TRACKING_USERNAME"] = setting("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = password("MLFLOW_AUTH_ADMIN_PASSWORD")
    wait_until_up(uri, float(os.environ.get("MLFLOW_USERS_WAIT_S", "120")))

    from mlflow.exceptions import RestException
    from mlflow.server import get_app_client

    client = get_app_client("basic-auth", tracking_uri=uri)
    for username, secret in users.items():
        try:
            client.get_user(username)
        except RestException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            client.create_user(username, secret)
            print(f"mlflow-users: created {username}")
        else:
            client.update_user_password(username, secret)
            print(f"mlflow-users: {username} exists; password set to the configured one")


if __name__ == "__main__":
    main()
