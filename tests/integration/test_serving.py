"""The serving service as a real process on loopback, serving a model from a real registry."""

from __future__ import annotations

import io
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import pytest
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.registry.pull import pull
from pipeline.registry.versions import promote
from services.serving.app import create_app
from services.serving.settings import ServingSettings
from tests.conftest import Service, register_model, served_split

pytestmark = pytest.mark.slow

CHUNK = 100  # float images: about 16 KB of JSON each


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_predictions_match_the_pulled_model(service: Service, tmp_path: Path) -> None:
    images, _ = served_split(service)
    images = images[:1000]
    client = MlflowClient(service.registry.uri)
    pull(client, service.registry.name, tmp_path / "pulled")
    expected = np.asarray(
        mlflow.pyfunc.load_model(str(tmp_path / "pulled")).predict(images.astype(np.float32) / 255)
    )
    served = []
    with httpx.Client(base_url=service.url, timeout=60) as http:
        for start in range(0, len(images), CHUNK):
            chunk = images[start : start + CHUNK].astype(np.float32) / 255
            reply = http.post("/v1/predict", json={"images": chunk.tolist()})
            assert reply.status_code == 200, reply.text
            served += [p["probabilities"] for p in reply.json()["predictions"]]
    served_array = np.asarray(served, dtype=np.float32)
    np.testing.assert_array_equal(served_array.argmax(axis=1), expected.argmax(axis=1))
    np.testing.assert_allclose(served_array, expected, rtol=0, atol=1e-5)


def test_accuracy_through_every_endpoint(service: Service) -> None:
    images, labels = served_split(service)
    with httpx.Client(base_url=service.url, timeout=60) as http:
        v1_digits = []
        for start in range(0, len(images), 5 * CHUNK):
            # 0-255 integers, the other accepted scale
            payload = {"images": images[start : start + 5 * CHUNK].astype(int).tolist()}
            reply = http.post("/v1/predict", json=payload)
            assert reply.status_code == 200, reply.text
            v1_digits += [p["digit"] for p in reply.json()["predictions"]]
        v1_accuracy = float((np.asarray(v1_digits) == labels).mean())

        v2_digits = []
        for start in range(0, len(images), CHUNK):
            chunk = images[start : start + CHUNK].astype(np.float32) / 255
            request = {
                "id": f"chunk-{start}",
                "inputs": [
                    {
                        "name": "images",
                        "shape": list(chunk.shape),
                        "datatype": "FP32",
                        "data": chunk.reshape(-1).tolist(),
                    }
                ],
            }
            reply = http.post(f"/v2/models/{service.registry.name}/infer", json=request)
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["id"] == f"chunk-{start}"
            (output,) = body["outputs"]
            assert output["shape"] == [len(chunk), 10]
            v2_digits += np.asarray(output["data"]).reshape(-1, 10).argmax(axis=1).tolist()
        v2_accuracy = float((np.asarray(v2_digits) == labels).mean())

        image_digits = []
        for image in images[:1000]:
            files = {"file": ("digit.png", _png(image), "image/png")}
            reply = http.post("/v1/predict/image", files=files)
            assert reply.status_code == 200, reply.text
            image_digits.append(reply.json()["predictions"][0]["digit"])
        image_accuracy = float((np.asarray(image_digits) == labels[:1000]).mean())
    assert v1_accuracy >= 0.99, v1_accuracy
    assert v2_accuracy >= 0.99, v2_accuracy
    assert image_accuracy >= 0.99, image_accuracy


def test_health_model_metrics_and_docs(service: Service) -> None:
    with httpx.Client(base_url=service.url, timeout=10) as http:
        assert http.get("/health/live").json() == {"status": "live"}
        ready = http.get("/health/ready").json()
        info = http.get("/v1/model").json()
        assert info["version"] == ready["model_version"]
        assert info["name"] == service.registry.name
        assert info["alias"] == "champion"
        assert info["test_accuracy"] >= 0.99
        assert http.get("/v2/health/ready").json() == {"ready": True}
        metadata = http.get(f"/v2/models/{service.registry.name}").json()
        assert metadata["inputs"][0]["shape"] == [-1, 28, 28]
        assert http.get(f"/v2/models/{service.registry.name}/ready").json()["ready"] is True
        assert http.get("/docs").status_code == 200
        assert "/v1/predict" in http.get("/openapi.json").json()["paths"]
        http.post("/v1/predict", json={"images": [[[0.0] * 28] * 28] * 3})
        metrics = http.get("/metrics").text
    assert 'mnist_requests_total{method="POST",route="/v1/predict",status="200"}' in metrics
    assert "mnist_batch_size_bucket" in metrics
    assert "mnist_request_latency_seconds_bucket" in metrics
    assert f'mnist_model_version{{name="{service.registry.name}"}}' in metrics


def _malformed_requests(name: str) -> list[dict[str, Any]]:
    """Over 500 bad requests of many kinds; each must get a 4xx with a JSON error."""
    rng = random.Random(0)
    good = [[0.5] * 28 for _ in range(28)]
    as_json = {"content-type": "application/json"}
    not_png = ("a.png", b"definitely not a png", "image/png")
    cases: list[dict[str, Any]] = [
        {"path": "/v1/predict", "content": b""},
        {"path": "/v1/predict", "content": b"not json", "headers": as_json},
        {"path": "/v1/predict", "content": b"{\"images\": [", "headers": as_json},
        {"path": "/v1/predict", "json": {}},
        {"path": "/v1/predict", "json": {"images": []}},
        {"path": "/v1/predict", "json": {"images": [good], "extra": 1}},
        {"path": "/v1/predict", "json": {"images": "zero"}},
        {"path": "/v1/predict", "json": [good]},
        {"path": "/v1/predict", "json": {"images": [good] * 601}},
        {"path": "/v1/predict", "content": b"{\"images\": [[[NaN" + b", 0" * 27 + b"]]]}",
         "headers": as_json},
        {"path": "/v1/predict", "content": b"x" * (3 * 1024 * 1024),
         "headers": as_json},
        {"path": "/v1/predict/image", "files": {"file": not_png}},
        {"path": "/v1/predict/image", "files": {"file": ("a.png", b"", "image/png")}},
        {"path": "/v1/predict/image", "data": {"file": "text field"}},
        {"path": "/v1/predict/image", "json": {"file": "x"}},
        {"path": f"/v2/models/{name}/infer", "json": {"inputs": []}},
        {"path": "/v2/models/other-model/infer", "json": {"inputs": [
            {"name": "images", "shape": [1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}},
        {"path": f"/v2/models/{name}/versions/999/infer", "json": {"inputs": [
            {"name": "images", "shape": [1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}]}},
        {"path": "/v1/nowhere", "json": {}},
        {"path": "/health/live", "json": {}},  # POST to a GET route: 405
    ]  # fmt: skip
    for _ in range(120):  # wrong shapes
        rows, cols = rng.choice([(27, 28), (28, 27), (29, 28), (1, 1), (0, 0), (28, 29)])
        cases.append({"path": "/v1/predict", "json": {"images": [[[0.1] * cols] * rows]}})
    for _ in range(120):  # out-of-range or wrong-type pixels
        image = [row[:] for row in good]
        image[rng.randrange(28)][rng.randrange(28)] = rng.choice(
            [-1, 256, 1e9, -0.001, "a", None, [1], {"v": 1}, True]
        )
        cases.append({"path": "/v1/predict", "json": {"images": [image]}})
    for _ in range(140):  # v2 tensors that do not fit
        shape = rng.choice([[1, 28, 28], [2, 784], [1, 1, 28, 28], [1, 27, 28], [0, 28, 28], [3]])
        count = max(1, int(np.prod(shape)))
        data: Any = [rng.random() for _ in range(count)]
        datatype = "FP32"
        mutation = rng.randrange(5)
        if mutation == 0 or shape in ([1, 27, 28], [0, 28, 28], [3]):
            data = data[:-1] if mutation == 0 else data
        elif mutation == 1:
            data[0] = 2.5
        elif mutation == 2:
            datatype = "BYTES"
        elif mutation == 3:
            data[0] = "NaN"
        else:
            datatype, data = "UINT8", [300] * count
        cases.append(
            {
                "path": f"/v2/models/{name}/infer",
                "json": {
                    "inputs": [
                        {"name": "images", "shape": shape, "datatype": datatype, "data": data}
                    ]
                },
            }
        )
    for _ in range(120):  # random JSON junk
        junk = rng.choice(
            [None, 1, "s", [], [[]], {"images": None}, {"images": [[[]]]}, {"inputs": 1}]
        )
        path = rng.choice(["/v1/predict", f"/v2/models/{name}/infer"])
        cases.append({"path": path, "json": junk})
    return cases


def test_malformed_requests_get_4xx_json_and_the_server_stays_up(service: Service) -> None:
    cases = _malformed_requests(service.registry.name)
    assert len(cases) >= 500
    with httpx.Client(base_url=service.url, timeout=30) as http:
        for case in cases:
            path = case.pop("path")
            reply = http.post(path, **case)
            assert 400 <= reply.status_code < 500, (path, case, reply.status_code, reply.text[:300])
            body = reply.json()
            assert isinstance(body["error"], str), body
            assert body["error"], body
        assert http.get("/health/live").status_code == 200
        good = http.post("/v1/predict", json={"images": [[[0.0] * 28] * 28]})
        assert good.status_code == 200
        metrics = http.get("/metrics").text
    assert 'status="500"' not in metrics


def test_errors_name_the_field(service: Service) -> None:
    image = [[0.0] * 28 for _ in range(28)]
    image[3][5] = 300
    with httpx.Client(base_url=service.url, timeout=10) as http:
        short = [[0.0] * 28 for _ in range(27)]
        body = http.post("/v1/predict", json={"images": [image, short]}).json()
        fields = {problem["field"] for problem in body["fields"]}
        assert "images.0.3.5" in fields
        assert "images.1" in fields
        too_many = http.post("/v1/predict", json={"images": [[[0.0] * 28] * 28] * 601})
        assert too_many.status_code == 413
        assert too_many.json()["fields"][0]["field"] == "images"
        upload = http.post("/v1/predict/image", files={"file": ("x.txt", b"hello", "text/plain")})
        assert upload.status_code == 415
        assert upload.json()["fields"][0]["field"] == "file"


def test_hot_reload_under_load_loses_no_request(service: Service) -> None:
    registry = service.registry
    client = MlflowClient(registry.uri)
    before = client.get_model_version_by_alias(registry.name, "champion")
    example = np.zeros((2, 28, 28), dtype=np.float32)
    accuracy = float(before.tags["test_accuracy"]) + 0.001  # a tie would keep the incumbent
    new_version = register_model(registry.uri, registry.name, registry.net, example, accuracy)
    versions_seen: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=service.url, timeout=30) as http:
            while not stop.is_set():
                reply = http.post("/v1/predict", json={"images": [[[0.2] * 28] * 28]})
                if reply.status_code != 200:
                    failures.append(f"{reply.status_code}: {reply.text[:200]}")
                else:
                    versions_seen.append(reply.json()["model_version"])

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(1.0)
    promote(client, registry.name, new_version, pause_s=0.0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not versions_seen or versions_seen[-1] != new_version):
        time.sleep(0.2)
    time.sleep(1.0)
    stop.set()
    for worker in workers:
        worker.join()
    assert not failures, failures[:5]
    assert versions_seen[0] == str(before.version)
    assert versions_seen[-1] == new_version
    switch = versions_seen.index(new_version)
    assert set(versions_seen[:switch]) == {str(before.version)}
    assert len(versions_seen) > 50


def test_no_model_yet_means_not_ready_not_failing(tmp_path: Path) -> None:
    settings = ServingSettings(
        model_uri="models:/absent@champion",
        tracking_uri=f"sqlite:///{tmp_path / 'empty.db'}",
        cache_dir=tmp_path / "cache",
        poll_interval_s=60,
    )
    with TestClient(create_app(settings)) as http:
        assert http.get("/health/live").status_code == 200
        ready = http.get("/health/ready")
        assert ready.status_code == 503
        assert "absent" in ready.json()["error"] or "loading" in ready.json()["error"]
        reply = http.post("/v1/predict", json={"images": [[[0.0] * 28] * 28]})
        assert reply.status_code == 503
        assert json.loads(reply.text)["kind"] == "not_ready"
