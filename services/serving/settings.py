"""Serving settings, from the environment (prefix `SERVING_`, tracking URI as MLflow names it)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, NonNegativeInt, PositiveFloat, PositiveInt
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.data.digits import MAX_PIXELS


class ServingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVING_", extra="ignore", populate_by_name=True)

    model_uri: str = "models:/mnist-classifier@champion"
    tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SERVING_TRACKING_URI", "MLFLOW_TRACKING_URI"),
        description="MLflow tracking server; unset means the project's sqlite:///mlflow.db",
    )
    cache_dir: Path = Path(".serving-cache")
    poll_interval_s: PositiveFloat = 30.0
    retry_failed_after_s: PositiveFloat = 300.0
    max_body_bytes: PositiveInt = 4 * 1024 * 1024
    max_images: PositiveInt = 256
    max_image_pixels: PositiveInt = MAX_PIXELS  # width x height of an upload, from its header
    max_image_decodes: PositiveInt = 2  # uploads decoded at once
    max_image_queue: NonNegativeInt = 16  # uploads waiting for a decode; past that, 503
    batch_max_images: PositiveInt = 128
    # Longer waits cost throughput: bench/README.md (serving, the batcher's wait).
    batch_max_wait_ms: PositiveFloat = 0.5
    inference_threads: PositiveInt = 1
    parity_tolerance: PositiveFloat = 1e-4
