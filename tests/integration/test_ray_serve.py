"""The serving app on Ray Serve: the config file validates, and a local Serve with two
replicas serves the registry's champion with the same answers as the in-memory network."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline.data.prepared import open_prepared
from tests.conftest import REPO, Registry, free_port

CONFIG = REPO / "services" / "serving" / "serve_config.yaml"
IMAGES = 200
CHUNK = 50


@pytest.fixture
def serve_http(local_ray: None) -> Iterator[str]:
    """Serve on the session's local Ray, its HTTP proxy on a free loopback port."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def _wait_ready(http: httpx.Client, timeout_s: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            reply = http.get("/health/ready")
            if reply.status_code == 200:
                ready: dict[str, str] = reply.json()
                return ready
            last = f"{reply.status_code}: {reply.text[:300]}"
        except httpx.HTTPError as error:
            last = repr(error)
        time.sleep(0.5)
    pytest.fail(f"/health/ready not 200 within {timeout_s} s: {last}")


@pytest.mark.slow
def test_ray_serve_replicas_serve_the_champion(
    registry: Registry, serve_http: str, tmp_path: Path
) -> None:
    import torch
    from ray import serve

    from services.serving.ray_app import build_app

    app = build_app(
        {
            "model_uri": f"models:/{registry.name}@champion",
            "tracking_uri": registry.uri,  # absolute: replicas run elsewhere
            "cache_dir": str(tmp_path / "cache"),
            "poll_interval_s": 5,
            "num_replicas": 2,  # both CPUs of the session's Ray; they share the cache
        }
    )
    serve.run(app, name="mnist", route_prefix="/")  # returns once both replicas started

    test = open_prepared(Path(registry.params.paths.prepared)).load("test")
    images = test.images[:IMAGES].astype(np.float32) / 255.0
    labels = test.labels[:IMAGES]
    with torch.no_grad():
        expected = registry.net(torch.from_numpy(images)).argmax(dim=1).numpy()
    champion = MlflowClient(registry.uri).get_model_version_by_alias(registry.name, "champion")

    with httpx.Client(base_url=serve_http, timeout=60) as http:
        assert _wait_ready(http)["model_version"] == str(champion.version)
        digits: list[int] = []
        for start in range(0, IMAGES, CHUNK):
            chunk = images[start : start + CHUNK]
            reply = http.post("/v1/predict", json={"images": chunk.tolist()})
            assert reply.status_code == 200, reply.text
            digits += [p["digit"] for p in reply.json()["predictions"]]

        # Single images, many at once: spread over both replicas, batched inside each.
        def one(index: int) -> tuple[int, int]:
            reply = http.post("/v1/predict", json={"images": [images[index].tolist()]})
            assert reply.status_code == 200, reply.text
            return index, reply.json()["predictions"][0]["digit"]

        with ThreadPoolExecutor(max_workers=16) as pool:
            singles = dict(pool.map(one, range(64)))

        info = http.get("/v1/model").json()

    np.testing.assert_array_equal(np.asarray(digits), expected)
    assert [singles[i] for i in range(64)] == expected[:64].tolist()
    accuracy = float((np.asarray(digits) == labels).mean())
    assert accuracy >= 0.98, accuracy
    assert info["name"] == registry.name
    assert info["version"] == str(champion.version)
    assert info["alias"] == "champion"
    status = serve.status().applications["mnist"]
    assert status.status == "RUNNING"
    (deployment,) = status.deployments.values()
    assert deployment.replica_states.get("RUNNING") == 2
