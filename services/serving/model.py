"""The served model: a registry version, pulled, verified and compiled to ONNX Runtime (refused
unless its probabilities match PyTorch's), and the holder whose poller swaps in new versions."""

from __future__ import annotations

import asyncio
import fcntl
import gc
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.data.atomic import atomic_path
from pipeline.registry.pull import METADATA, pull, store_uri
from services.serving.metrics import ServingMetrics
from services.serving.schemas import ModelInfo, ModelLoadError
from services.serving.settings import ServingSettings

log = logging.getLogger(__name__)

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
PARITY_BATCH = 32


@dataclass(frozen=True)
class ServedModel:
    info: ModelInfo
    session: ort.InferenceSession

    def predict(self, images: np.ndarray) -> np.ndarray:
        name = self.session.get_inputs()[0].name
        return np.asarray(self.session.run(None, {name: images})[0])


def _export_onnx(model_dir: Path, target: Path) -> None:
    for chatty in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    module = mlflow.pytorch.load_model(str(model_dir))
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(module, (torch.rand(4, 28, 28),), dynamic_shapes=({0: batch},))
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    if onnx_program is None:
        raise ModelLoadError(f"{model_dir}: ONNX export produced nothing")
    with atomic_path(target) as staged:
        staged.write_bytes(onnx_program.model_proto.SerializeToString())


def load(settings: ServingSettings, version: ModelVersion, alias: str | None) -> ServedModel:
    """Pull (verified), compile to ONNX Runtime, check parity; cached per version."""
    name, number = version.name, str(version.version)
    model_dir = settings.cache_dir / name / number
    onnx_path = model_dir.parent / f"{number}.onnx"
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    # Processes that share the cache (Ray replicas on a node) fill it one at a time: the first
    # pulls and exports, the others reuse its files.
    with (settings.cache_dir / ".load.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (model_dir / METADATA).is_file():
            log.info("pulling %s version %s", name, number)
            pull(MlflowClient(store_uri(settings.tracking_uri)), name, model_dir, version=number)
        if not onnx_path.is_file():
            _export_onnx(model_dir, onnx_path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.inference_threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    info = ModelInfo(
        name=name,
        version=number,
        alias=alias,
        run_id=str(version.run_id),
        model_type=version.tags.get("model_type", "?"),
        test_accuracy=float(version.tags.get("test_accuracy", "nan")),
    )
    served = ServedModel(info, session)
    example = json.loads((model_dir / "input_example.json").read_text())
    random_images = np.random.default_rng(0).random((PARITY_BATCH, 28, 28), dtype=np.float32)
    inputs = np.concatenate([np.asarray(example, dtype=np.float32), random_images])
    reference = np.asarray(mlflow.pyfunc.load_model(str(model_dir)).predict(inputs))
    difference = float(np.abs(served.predict(inputs) - reference).max())
    if difference > settings.parity_tolerance:
        raise ModelLoadError(
            f"{name} version {number}: ONNX Runtime differs from PyTorch by {difference:.2e} "
            f"(> {settings.parity_tolerance:g}); refusing to serve it"
        )
    log.info("serving %s version %s (ONNX parity %.1e)", name, number, difference)
    return served


class ModelHolder:
    """Holds the served model; a swap is one reference assignment, so readers never see half."""

    def __init__(self, settings: ServingSettings, metrics: ServingMetrics) -> None:
        if not (uri := _URI.match(settings.model_uri)):
            forms = "models:/<name>@<alias> or models:/<name>/<version>"
            raise ModelLoadError(f"model URI {settings.model_uri!r}: expected {forms}")
        self.settings, self.metrics = settings, metrics
        self.name, self.alias, self.number = uri["name"], uri["alias"], uri["version"]
        self.model: ServedModel | None = None
        self.last_error: str | None = "loading"
        # The last version that failed to load, and when it may be retried (a cool-down).
        self._refused: tuple[str | None, float] = (None, 0.0)

    def require(self) -> ServedModel:
        if self.model is None:
            raise ModelLoadError(f"no model loaded yet ({self.last_error})")
        return self.model

    def current(self) -> ModelVersion:
        """The version the URI points at now (an alias moves, a version does not)."""
        client = MlflowClient(store_uri(self.settings.tracking_uri))
        try:
            if self.number:
                return client.get_model_version(self.name, self.number)
            return client.get_model_version_by_alias(self.name, self.alias or "champion")
        except MlflowException as error:
            raise ModelLoadError(f"models:/{self.name}: {error.message}") from None

    def refresh(self) -> None:
        """Load the version the URI points at, if it is new (and not cooling down)."""
        version = self.current()
        number, was = str(version.version), self.model.info.version if self.model else None
        refused, retry_at = self._refused
        if number == was or (number == refused and time.monotonic() < retry_at):
            return
        try:
            loaded = load(self.settings, version, self.alias)
        except Exception as error:
            self._refused = (number, time.monotonic() + self.settings.retry_failed_after_s)
            self.metrics.reloads.labels("failed").inc()
            raise ModelLoadError(f"version {number}: {error}") from error
        self.model, self.last_error = loaded, None
        self.metrics.model_version.labels(version.name).set(float(number))
        self.metrics.reloads.labels("swapped").inc()
        log.info(
            "now serving %s version %s%s", version.name, number, f" (was {was})" if was else ""
        )
        # Loading leaves a large heap: frozen, it stays out of the collector's full passes,
        # which stall requests; unfreezing first lets the replaced model be collected.
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    async def poll(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as error:  # noqa: BLE001 - keep serving what we have
                self.last_error = str(error)
                self.metrics.errors.labels("model_load").inc()
                log.warning("model refresh failed: %s", error)
            await asyncio.sleep(self.settings.poll_interval_s)
