"""Environment configuration (addresses, mirrors, secrets): never in params.yaml."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Read from the environment; each field is the upper-case variable of its name."""

    model_config = SettingsConfigDict(extra="ignore")

    mnist_mirror: str | None = None
    """A folder or URL tried before the mirrors of params.yaml."""
    ray_address: str | None = None
    """Join this Ray cluster; unset starts a local Ray for the run."""
    ray_api_server_address: str | None = None
    """The Ray Jobs API (dashboard URL) `submit` talks to; unset: RAY_ADDRESS, then local."""
    pipeline_git_commit: str | None = None
    """The project's commit when it runs from a copy without .git (a Ray job's upload)."""
    mlflow_tracking_uri: str | None = None
    """The MLflow tracking server or store; unset means `sqlite:///mlflow.db` in the project."""
    tracking_wait_s: float = 300.0
    """How long a training that has finished waits for an unreachable tracking server before
    it stops with the checkpoints kept (a rerun then finishes the same run)."""

    def jobs_address(self) -> str:
        return self.ray_api_server_address or self.ray_address or "http://127.0.0.1:8265"
