"""What the routes need from the app: settings, metrics, the model holder, the batcher."""

from __future__ import annotations

from dataclasses import dataclass

from services.serving.batching import MicroBatcher
from services.serving.decoding import DecodeGate
from services.serving.holder import ModelHolder
from services.serving.metrics import ServingMetrics
from services.serving.settings import ServingSettings


@dataclass
class ServingState:
    settings: ServingSettings
    metrics: ServingMetrics
    holder: ModelHolder
    batcher: MicroBatcher
    decodes: DecodeGate
