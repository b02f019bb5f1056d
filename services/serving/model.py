"""The served model: a registry version, pulled and verified, compiled to ONNX Runtime.

Loading checks parity: ONNX Runtime's probabilities must match PyTorch's on the model's own
input example and on random images, or the version is refused.
"""

from __future__ import annotations

import json
import logging
import re
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
from services.serving.schemas import ModelInfo
from services.serving.settings import ServingSettings

log = logging.getLogger(__name__)

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
ONNX_FILE = "model.onnx"
PARITY_BATCH = 32


class ModelLoadError(RuntimeError):
    """A model version that cannot be served; the message says which and why."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str | None
    version: str | None

    @classmethod
    def parse(cls, uri: str) -> ModelRef:
        match = _URI.match(uri)
        if not match:
            raise ModelLoadError(
                f"model URI {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>"
            )
        return cls(match["name"], match["alias"], match["version"])


@dataclass(frozen=True)
class ServedModel:
    info: ModelInfo
    session: ort.InferenceSession

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> str:
        return self.info.version

    def predict(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, 28, 28) in [0, 1] -> float32 (N, 10) probabilities."""
        name = self.session.get_inputs()[0].name
        return np.asarray(self.session.run(None, {name: images})[0])


def client_for(settings: ServingSettings) -> MlflowClient:
    return MlflowClient(store_uri(settings.tracking_uri))


def current_version(client: MlflowClient, ref: ModelRef) -> ModelVersion:
    """The version the reference points at now (an alias moves, a version does not)."""
    try:
        if ref.version:
            return client.get_model_version(ref.name, ref.version)
        return client.get_model_version_by_alias(ref.name, ref.alias or "champion")
    except MlflowException as error:
        raise ModelLoadError(f"models:/{ref.name}: {error.message}") from None


def _export_onnx(model_dir: Path, target: Path) -> None:
    """PyTorch (the pt2 program) -> ONNX with a dynamic batch dimension, atomically."""
    for chatty in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    module = mlflow.pytorch.load_model(str(model_dir))
    example = torch.rand(4, 28, 28)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    if onnx_program is None:
        raise ModelLoadError(f"{model_dir}: ONNX export produced nothing")
    with atomic_path(target) as staged:
        staged.write_bytes(onnx_program.model_proto.SerializeToString())


def _parity_inputs(model_dir: Path) -> np.ndarray:
    example = json.loads((model_dir / "input_example.json").read_text())
    rng = np.random.default_rng(0)
    random_images = rng.random((PARITY_BATCH, 28, 28), dtype=np.float32)
    return np.concatenate([np.asarray(example, dtype=np.float32), random_images])


def load(settings: ServingSettings, version: ModelVersion, alias: str | None) -> ServedModel:
    """Pull (verified), compile to ONNX Runtime, check parity; cached per version."""
    client = client_for(settings)
    name, number = version.name, str(version.version)
    model_dir = settings.cache_dir / name / number
    if not (model_dir / METADATA).is_file():
        log.info("pulling %s version %s", name, number)
        pull(client, name, model_dir, version=number)
    onnx_path = model_dir.parent / f"{number}.onnx"
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
    inputs = _parity_inputs(model_dir)
    reference = np.asarray(mlflow.pyfunc.load_model(str(model_dir)).predict(inputs))
    difference = float(np.abs(served.predict(inputs) - reference).max())
    if difference > settings.parity_tolerance:
        raise ModelLoadError(
            f"{name} version {number}: ONNX Runtime differs from PyTorch by {difference:.2e} "
            f"(> {settings.parity_tolerance:g}); refusing to serve it"
        )
    log.info("serving %s version %s (ONNX parity %.1e)", name, number, difference)
    return served
