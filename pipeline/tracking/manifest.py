"""What a logged model promises: its input contract and its files' SHA-256; light on purpose
(hashlib only): `pull`, and so the serving service, verify downloads with it."""

from __future__ import annotations

import hashlib
from pathlib import Path

MANIFEST_TAG = "model.files_sha256"
INPUT_CONTRACT = (
    "images: float32 array (N, 28, 28), grayscale, pixel values in [0, 1], raw (the model "
    "normalises); output: float32 (N, 10) class probabilities, predicted digit = argmax"
)


# Written by MLflow into each download of a `models:/` URI, so it differs per download.
_DOWNLOAD_NOTE = "registered_model_meta"


def files_sha256(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != _DOWNLOAD_NOTE
    }
