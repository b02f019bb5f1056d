"""Pull a registered model with its metadata, verified; predict with a pulled model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.config.env import Settings
from pipeline.data.atomic import atomic_path
from pipeline.data.digits import MAX_PIXELS, ImageError, image_bytes_to_mnist
from pipeline.registry.versions import RegistryError
from pipeline.tracking.manifest import INPUT_CONTRACT, MANIFEST_TAG, files_sha256
from pipeline.tracking.runs import tracking_uri

METADATA = "metadata.json"


def store_uri(explicit: str | None = None) -> str:
    """The registry to pull from: `explicit`, else MLFLOW_TRACKING_URI, else the project's."""
    return tracking_uri(Settings(mlflow_tracking_uri=explicit))


def pull(
    client: MlflowClient, name: str, out: Path, alias: str | None = None, version: str | None = None
) -> dict[str, Any]:
    """`name@alias` (or version) into `out` with `metadata.json`, only once every file matches
    the checksums recorded when the model was logged."""
    try:
        found = (
            client.get_model_version(name, version)
            if version
            else client.get_model_version_by_alias(name, alias or "champion")
        )
    except MlflowException as error:
        wanted = f"version {version}" if version else f"alias @{alias or 'champion'}"
        raise RegistryError(f"{name}: no {wanted} in the registry ({error.message})") from None
    expected = json.loads(found.tags.get(MANIFEST_TAG, "{}"))
    if not expected:
        raise RegistryError(f"{name} version {found.version} has no checksums ({MANIFEST_TAG})")
    with atomic_path(out) as staged:
        # From the version's own artifact location, with this client's store: a models:/ URI
        # would be resolved against the process-wide registry (MLflow ignores registry_uri
        # there), i.e. ./mlflow.db when MLFLOW_TRACKING_URI is unset.
        source = client.get_model_version_download_uri(name, found.version)
        # It lands in a folder named as the source's last part: the staged folder is that one.
        downloaded = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(staged.parent), tracking_uri=client.tracking_uri
        )
        os.replace(downloaded, staged)
        actual = files_sha256(staged)
        if actual != expected:
            keys = expected.keys() | actual.keys()
            bad = sorted(k for k in keys if expected.get(k) != actual.get(k))
            raise RegistryError(f"{name} version {found.version}: download does not verify: {bad}")
        model = mlflow.pyfunc.load_model(str(staged))
        probabilities = np.asarray(model.predict(np.zeros((2, 28, 28), dtype=np.float32)))
        sums = probabilities.sum(axis=1)
        if probabilities.shape != (2, 10) or not np.allclose(sums, 1, atol=1e-4):
            raise RegistryError(f"{name} version {found.version} does not predict probabilities")
        tags = found.tags
        metrics = {k: float(tags.get(k, "nan")) for k in ("test_accuracy", "test_loss")}
        metadata: dict[str, Any] = {"registered_model": name, "version": found.version}
        metadata["aliases"] = list(found.aliases)
        metadata |= {"run_id": found.run_id, "model_type": tags.get("model_type")}
        metadata["metrics"] = metrics
        metadata |= {k: tags.get(k) for k in ("data_digest", "git_commit")}
        metadata |= {"input_contract": INPUT_CONTRACT, "files_sha256": actual}
        (staged / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def predict_files(
    model_dir: Path, images: list[Path], max_pixels: int = MAX_PIXELS
) -> list[dict[str, Any]]:
    """Digit and probabilities per image file; a refused file gets {"file", "error", "kind"}."""
    if not (model_dir / "MLmodel").is_file():
        raise FileNotFoundError(f"{model_dir} holds no MLflow model: run `mnist-pipeline pull`")
    results: list[dict[str, Any]] = []
    accepted: dict[int, np.ndarray] = {}
    for index, path in enumerate(images):
        try:
            accepted[index] = image_bytes_to_mnist(path.read_bytes(), max_pixels)
            results.append({"file": str(path)})
        except ImageError as error:
            results.append({"file": str(path), "error": str(error), "kind": error.kind})
    if accepted:
        batch = np.stack(list(accepted.values()))
        probabilities = np.asarray(mlflow.pyfunc.load_model(str(model_dir)).predict(batch))
        for index, row in zip(accepted, probabilities, strict=True):
            results[index]["digit"] = int(row.argmax())
            results[index]["probabilities"] = [round(float(p), 6) for p in row]
    return results
