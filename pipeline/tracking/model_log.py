"""The logged model: its signature, pickle-free upload and the manifest that verifies it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from torch import nn

from pipeline.models.networks import IMAGE_SIZE, NUM_CLASSES, Probabilities
from pipeline.tracking.manifest import INPUT_CONTRACT, MANIFEST_TAG, files_sha256

MODEL_ARTIFACT = "model"


def signature() -> ModelSignature:
    """Unnamed tensors: a named input makes pyfunc hand the flavor a dict, which it refuses."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, IMAGE_SIZE, IMAGE_SIZE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES))]),
    )


def log_model(net: nn.Module, example: np.ndarray, metadata: dict[str, Any]) -> str:
    """Log `net` (as probabilities) pickle-free into the active run, its files' SHA-256 in a
    tag so that a later download can be verified; its model URI."""
    # Stated, not inferred: inference reloads the model in a subprocess (slow) and keeps
    # torch's `+cpu` label, which PyPI cannot resolve.
    pins = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    info = mlflow.pytorch.log_model(
        Probabilities(net).eval(),
        name=MODEL_ARTIFACT,
        serialization_format="pt2",
        signature=signature(),
        input_example=example.astype(np.float32),
        metadata=metadata | {"input_contract": INPUT_CONTRACT},
        pip_requirements=[*pins, f"numpy=={np.__version__}"],
    )
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=scratch))
        mlflow.set_tag(MANIFEST_TAG, json.dumps(files_sha256(local), sort_keys=True))
    return str(info.model_uri)
