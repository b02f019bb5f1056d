"""Which model is served now, and the poller that swaps in a new version when the alias moves."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

from mlflow.entities.model_registry import ModelVersion

from services.serving.background import Background
from services.serving.metrics import ServingMetrics
from services.serving.model import (
    ModelLoadError,
    ModelRef,
    ServedModel,
    client_for,
    current_version,
    load,
)
from services.serving.settings import ServingSettings

log = logging.getLogger(__name__)

Loader = Callable[[ServingSettings, ModelVersion, "str | None"], ServedModel]


class ModelHolder:
    """Holds the served model; a swap is one reference assignment, so readers never see half."""

    def __init__(
        self, settings: ServingSettings, metrics: ServingMetrics, loader: Loader = load
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.ref = ModelRef.parse(settings.model_uri)
        self._loader = loader
        self._model: ServedModel | None = None
        self._background = Background(self._poll, "model-poller")
        self.last_error: str | None = "loading"
        # A version that failed to load, and when: retried only after a cool-down.
        self._refused: tuple[str, float] | None = None

    @property
    def model(self) -> ServedModel | None:
        return self._model

    def require(self) -> ServedModel:
        if self._model is None:
            raise ModelLoadError(f"no model loaded yet ({self.last_error})")
        return self._model

    def refresh(self) -> bool:
        """Load the version the reference points at, if it is new; True if swapped."""
        version = current_version(client_for(self.settings), self.ref)
        number = str(version.version)
        if self._model is not None and self._model.version == number:
            return False
        refused = self._refused
        cooling = refused and time.monotonic() - refused[1] < self.settings.retry_failed_after_s
        if refused and refused[0] == number and cooling:
            return False
        try:
            loaded = self._loader(self.settings, version, self.ref.alias)
        except Exception as error:
            self._refused = (number, time.monotonic())
            self.metrics.reloads.labels("failed").inc()
            raise ModelLoadError(f"version {number}: {error}") from error
        previous = self._model.version if self._model else None
        self._model = loaded
        self.last_error = None
        self.metrics.model_version.labels(loaded.name).set(float(loaded.version))
        self.metrics.reloads.labels("swapped").inc()
        log.info(
            "now serving %s version %s%s",
            loaded.name,
            loaded.version,
            f" (was {previous})" if previous else "",
        )
        # Loading (MLflow, torch.export, ONNX) leaves a large heap; freezing it keeps the
        # collector's full passes, which otherwise stall requests for tens of ms, short.
        # Unfreezing first lets the replaced model's cycles be collected.
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        return True

    async def _poll(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as error:  # noqa: BLE001 - keep serving what we have
                self.last_error = str(error)
                self.metrics.errors.labels("model_load").inc()
                log.warning("model refresh failed: %s", error)
            await asyncio.sleep(self.settings.poll_interval_s)

    def start(self) -> None:
        self._background.start()

    async def stop(self) -> None:
        await self._background.stop()
