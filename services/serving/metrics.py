"""Prometheus metrics, in a registry per app (no global state between apps or tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = into = CollectorRegistry()
        self.requests = Counter(
            "mnist_requests", "HTTP requests", ["route", "method", "status"], registry=into
        )
        self.latency = Histogram(
            "mnist_request_latency_seconds",
            "Request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=into,
        )
        self.batch_size = Histogram(
            "mnist_batch_size", "Images per inference batch", buckets=BATCH_BUCKETS, registry=into
        )
        self.images = Counter("mnist_images_predicted", "Images predicted", registry=into)
        self.errors = Counter("mnist_errors", "Errors by kind", ["kind"], registry=into)
        self.model_version = Gauge(
            "mnist_model_version", "The served model version", ["name"], registry=into
        )
        self.reloads = Counter(
            "mnist_model_reloads", "Model swaps by outcome", ["outcome"], registry=into
        )
