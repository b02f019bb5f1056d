"""Prometheus metrics, in a registry per app (no global state between apps or tests)."""

from __future__ import annotations

from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = into = CollectorRegistry()
        counter, histogram = partial(Counter, registry=into), partial(Histogram, registry=into)
        self.requests = counter("mnist_requests", "HTTP requests", ["route", "method", "status"])
        latency = ("mnist_request_latency_seconds", "Request latency", ["route"])
        self.latency = histogram(*latency, buckets=LATENCY_BUCKETS)
        batches = ("mnist_batch_size", "Images per inference batch")
        self.batch_size = histogram(*batches, buckets=BATCH_BUCKETS)
        self.images = counter("mnist_images_predicted", "Images predicted")
        self.errors = counter("mnist_errors", "Errors by kind", ["kind"])
        versions = ("mnist_model_version", "The served model version", ["name"])
        self.model_version = Gauge(*versions, registry=into)
        self.reloads = counter("mnist_model_reloads", "Model swaps by outcome", ["outcome"])
