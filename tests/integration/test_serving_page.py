"""The drawing page, in a real headless Chromium, against the real service and a real model.

A small CNN is fitted for a few seconds on prepared MNIST, logged and registered in a temporary
SQLite MLflow store (no server), and served by the app under uvicorn on loopback.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from mlflow.tracking import MlflowClient
from playwright.sync_api import Browser, Page, sync_playwright
from torch import nn

from pipeline.config.nets import CNNNetConfig
from pipeline.data.prepared import open_prepared
from pipeline.models.networks import build_network
from pipeline.tracking.manifest import MANIFEST_TAG
from pipeline.tracking.model_log import log_model
from services.serving.app import create_app
from services.serving.settings import ServingSettings
from tests.conftest import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MODEL_NAME = "page-test-classifier"


@dataclass(frozen=True)
class RegisteredModel:
    tracking_uri: str
    name: str
    version: str
    run_id: str


def fit_small_cnn(prepared: Path, limit: int = 3000, epochs: int = 2) -> nn.Module:
    """A real CNN fitted for seconds on the first `limit` prepared training images."""
    data = open_prepared(prepared)
    train = data.load("train")
    images = torch.from_numpy(train.images[:limit].astype(np.float32) / 255.0)
    labels = torch.from_numpy(train.labels[:limit].astype(np.int64))
    torch.manual_seed(0)
    net = build_network(
        "cnn",
        CNNNetConfig(channels=[8, 16]).model_dump(),
        data.normalization.mean,
        data.normalization.std,
    )
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            optimiser.zero_grad()
            loss_fn(net(images[batch]), labels[batch]).backward()
            optimiser.step()
    return net.eval()


@contextmanager
def using_store(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs at `uri` for the block, then restored.

    The fluent API logs there; the service resolves `models:/` downloads there too (it passes
    its tracking URI to MLflow, not a registry URI, so the process-wide one must agree).
    """
    from mlflow.tracking._tracking_service import utils

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_REGISTRY_URI", uri)
        patch.setattr(utils, "_tracking_uri", uri)
        yield


def register_model(net: nn.Module, example: np.ndarray, uri: str, folder: Path) -> RegisteredModel:
    """Log `net` into the store at `uri` (active), register it, alias it champion."""
    client = MlflowClient(uri)
    experiment = client.create_experiment(
        "serving-page", artifact_location=(folder / "artifacts").as_uri()
    )
    with mlflow.start_run(experiment_id=experiment) as run:
        model_uri = log_model(net, example, metadata={})
    run_id = run.info.run_id
    model_id = model_uri.removeprefix("models:/")
    manifest = client.get_run(run_id).data.tags[MANIFEST_TAG]
    client.create_registered_model(MODEL_NAME)
    version = client.create_model_version(
        MODEL_NAME,
        source=client.get_logged_model(model_id).artifact_location,
        run_id=run_id,
        model_id=model_id,
        tags={"model_type": "cnn", "test_accuracy": "0.9", MANIFEST_TAG: manifest},
    )
    client.set_registered_model_alias(MODEL_NAME, "champion", version.version)
    return RegisteredModel(uri, MODEL_NAME, str(version.version), run_id)


@pytest.fixture(scope="module")
def registered_model(
    data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegisteredModel]:
    """A fitted CNN registered as champion in a fresh SQLite store, active for the module."""
    folder = tmp_path_factory.mktemp("page-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    net = fit_small_cnn(data_root / "prepared")
    example = open_prepared(data_root / "prepared").load("test").images[:2] / 255.0
    with using_store(uri):
        yield register_model(net, example, uri, folder)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def _post_json(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@contextmanager
def serve_in_thread(app: FastAPI, timeout_s: float = 30) -> Iterator[str]:
    """Run `app` under uvicorn on a free loopback port in a background thread; yield its URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive():
                pytest.fail("uvicorn stopped before it started serving")
            if time.monotonic() > deadline:
                pytest.fail(f"uvicorn did not start within {timeout_s} s")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until_ready(url: str, app: FastAPI, timeout_s: float = 120) -> None:
    """Poll /health/ready until the model is loaded; fail with the holder's last error."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, _ = _get(f"{url}/health/ready")
        if status == 200:
            return
        error = app.state.serving.holder.last_error
        if error not in (None, "loading"):
            pytest.fail(f"the service could not load its model: {error}")
        time.sleep(0.25)
    pytest.fail(f"{url} not ready within {timeout_s} s: {app.state.serving.holder.last_error}")


@pytest.fixture(scope="module")
def service_url(
    registered_model: RegisteredModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The real serving app, loading the registered champion, on loopback."""
    settings = ServingSettings(
        model_uri=f"models:/{registered_model.name}@champion",
        cache_dir=tmp_path_factory.mktemp("serving-cache"),
        poll_interval_s=1,
        # The field reads only its aliases: passed as `tracking_uri=` it would be ignored.
        **{"SERVING_TRACKING_URI": registered_model.tracking_uri},
    )
    app = create_app(settings)
    with serve_in_thread(app) as url:
        wait_until_ready(url, app)
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Tab:
    page: Page
    errors: list[str]


@pytest.fixture
def tab(browser: Browser, service_url: str) -> Iterator[Tab]:
    """The page, opened fresh (no animations); script and console errors are collected."""
    context = browser.new_context(viewport={"width": 1000, "height": 760}, reduced_motion="reduce")
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
    page.on(
        "console",
        lambda message: (
            errors.append(f"console: {message.text}") if message.type == "error" else None
        ),
    )
    page.set_default_timeout(20_000)
    page.goto(f"{service_url}/")
    try:
        yield Tab(page, errors)
    finally:
        context.close()


def draw(page: Page, points: list[tuple[float, float]]) -> None:
    """One stroke through `points`, given as fractions of the pad's width and height."""
    box = page.locator("#pad").bounding_box()
    assert box is not None

    def at(fx: float, fy: float) -> tuple[float, float]:
        return box["x"] + fx * box["width"], box["y"] + fy * box["height"]

    page.mouse.move(*at(*points[0]))
    page.mouse.down()
    for point in points[1:]:
        page.mouse.move(*at(*point), steps=12)
    page.mouse.up()


def shown_probabilities(page: Page) -> dict[int, float]:
    pairs = page.eval_on_selector_all(
        "#bars .bar", "bars => bars.map(b => [Number(b.dataset.digit), Number(b.dataset.p)])"
    )
    return {int(digit): float(p) for digit, p in pairs}


PREDICTION_SHOWN = """() => {
  const digit = document.querySelector('#digit').textContent.trim();
  const ps = [...document.querySelectorAll('#bars .bar')].map(b => Number(b.dataset.p));
  const total = ps.reduce((a, b) => a + b, 0);
  return /^[0-9]$/.test(digit) && ps.length === 10 && Math.abs(total - 1) < 1e-3;
}"""
ONE = [(0.5, 0.15), (0.5, 0.85)]


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no Chromium at {CHROMIUM} (apt chromium)")
def test_drawn_digit_is_classified_and_shown(
    tab: Tab, service_url: str, registered_model: RegisteredModel, tmp_path: Path
) -> None:
    page = tab.page
    version_text = f"version {registered_model.version}"
    page.wait_for_function(
        "text => document.querySelector('#version').textContent.includes(text)",
        arg=f"{registered_model.name} {version_text}",
    )
    assert page.locator("#bars .bar").count() == 10

    with page.expect_request("**/v1/predict") as sent:
        draw(page, ONE)
    page.wait_for_function(PREDICTION_SHOWN)

    probabilities = shown_probabilities(page)
    assert sorted(probabilities) == list(range(10))
    digit = int(page.locator("#digit").inner_text())
    assert digit == max(probabilities, key=lambda d: probabilities[d])
    assert version_text in page.locator("#version").inner_text()
    assert page.locator("#bars .bar.top").get_attribute("data-digit") == str(digit)
    assert "error" not in (page.locator("#status").get_attribute("class") or "")

    # What the page sent is MNIST-style: 28x28 in [0, 1], the ink scaled to fit 20x20 and
    # centred by mass; the service answers it with what the page shows.
    body = json.loads(sent.value.post_data or "{}")
    image = np.asarray(body["images"][0], dtype=np.float64)
    assert image.shape == (28, 28)
    assert image.min() >= 0
    assert 0.5 < image.max() <= 1
    rows, cols = np.nonzero(image)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert height == 20
    assert width <= 8
    ys, xs = np.indices(image.shape)
    centre = ((ys * image).sum() / image.sum(), (xs * image).sum() / image.sum())
    assert abs(centre[0] - 14) <= 1, centre
    assert abs(centre[1] - 14) <= 1, centre
    status, reply = _post_json(f"{service_url}/v1/predict", body)
    assert status == 200
    assert reply["model_version"] == registered_model.version
    assert reply["predictions"][0]["digit"] == digit
    np.testing.assert_allclose(
        reply["predictions"][0]["probabilities"],
        [probabilities[d] for d in range(10)],
        atol=1e-6,
    )

    page.screenshot(path=str(tmp_path / "page-desktop.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    pad = page.locator("#pad").bounding_box()
    assert pad is not None
    assert pad["x"] >= 0
    assert pad["x"] + pad["width"] <= 390
    page.screenshot(path=str(tmp_path / "page-phone.png"), full_page=True)
    assert tab.errors == []


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no Chromium at {CHROMIUM} (apt chromium)")
def test_clear_resets_and_errors_are_shown(tab: Tab, tmp_path: Path) -> None:
    page = tab.page
    draw(page, ONE)
    page.wait_for_function(PREDICTION_SHOWN)

    page.locator("#clear").click()
    assert page.locator("#digit").inner_text() == "–"
    assert set(shown_probabilities(page).values()) == {0.0}

    # A service without a model answers 503: the page says so in its status line.
    not_ready = {"error": "no model loaded yet (loading)", "kind": "not_ready", "fields": []}
    page.route(
        "**/v1/predict",
        lambda route: route.fulfill(
            status=503, content_type="application/json", body=json.dumps(not_ready)
        ),
    )
    draw(page, [(0.3, 0.3), (0.7, 0.3), (0.4, 0.8)])
    status = page.locator("#status")
    status.filter(has_text="503").wait_for()
    assert "no model loaded yet" in status.inner_text()
    assert "error" in (status.get_attribute("class") or "")
    assert page.locator("#digit").inner_text() == "–"
    page.screenshot(path=str(tmp_path / "page-error.png"))
    assert [e for e in tab.errors if "503" not in e] == []
