"""MLflow against a real `mlflow server` on loopback: runs, lineage, registry, pull, serving."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from pipeline import cli, evaluate
from pipeline.compat.dvc import folder_hash as dvc_hash
from pipeline.config.base import MODEL_NAMES
from pipeline.config.env import Settings
from pipeline.config.params import Params
from pipeline.data.digits import to_mnist
from pipeline.data.prepared import open_prepared
from pipeline.models.artifact import load_model
from pipeline.models.networks import Probabilities
from pipeline.registry import register
from pipeline.registry.pull import predict_files, pull
from pipeline.registry.versions import (
    CHAMPION,
    Candidate,
    RegistryError,
    decide_and_promote,
    promote,
    rollback,
)
from pipeline.tracking.manifest import MANIFEST_TAG
from pipeline.tracking.runs import DESCRIPTION_TAG, KIND_TAG, TrackingError
from pipeline.training.driver import TrainOutcome, train_model
from tests.conftest import free_port, running, small_params

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Trained:
    params: Params
    settings: Settings
    outcomes: dict[str, TrainOutcome]


@pytest.fixture(scope="module")
def trained(
    data_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
    mlflow_server: str,
    local_ray: None,
) -> Trained:
    """Both models trained, evaluated and registered through the server, on the small profile."""
    out = tmp_path_factory.mktemp("tracked")
    params = small_params(
        data_root,
        **{f"paths.{k}": str(out / k) for k in ("models", "metrics", "plots", "reports")},
        **{"train.storage_path": str(out / "ray"), "mlflow.experiment": "test-tracking"},
    )
    settings = Settings(mlflow_tracking_uri=mlflow_server)
    outcomes = {name: train_model(params, name, settings) for name in MODEL_NAMES}
    for name in MODEL_NAMES:
        evaluate.run(params, name, settings)
    register.run(params, settings)
    return Trained(params, settings, outcomes)


def _client(trained: Trained) -> MlflowClient:
    return MlflowClient(trained.settings.mlflow_tracking_uri)


def test_one_run_per_model_with_epochs_lineage_and_artifacts(trained: Trained) -> None:
    client = _client(trained)
    experiment = client.get_experiment_by_name("test-tracking")
    assert experiment is not None
    # The UI opens it on its runs, not on the GenAI overview.
    assert experiment.tags[KIND_TAG] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.data.tags["model_type"] for run in runs) == ["cnn", "mlp"]
    prepared = Path(trained.params.paths.prepared)
    for run in runs:
        name = run.data.tags["model_type"]
        epochs = trained.params.train.model(name).epochs  # type: ignore[arg-type]
        assert run.info.status == "FINISHED"
        assert run.info.run_id == trained.outcomes[name].spec.run_id
        for key in ("train/loss", "val/loss", "val/accuracy"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert steps == list(range(epochs)), f"{name} {key} steps {steps}"
        assert run.data.metrics["test/accuracy"] > 0.8
        assert "test/loss" in run.data.metrics
        assert any(key.startswith("system/") for key in run.data.metrics)
        assert run.data.params[f"train.{name}.lr"] == str(trained.params.train.model(name).lr)  # type: ignore[arg-type]
        assert run.data.params["ray.num_workers"] == "2"
        assert run.data.params["ray.cpus_per_worker"] == "1"
        assert run.data.tags["git_commit"] != ""
        spec = trained.outcomes[name].spec
        description = run.data.tags[DESCRIPTION_TAG]
        assert description.startswith(f"{name}: best val/accuracy {spec.val_accuracy:.4f} ")
        assert f"at epoch {spec.epoch} " in description
        assert run.data.tags["model_uri"] in description
        (dataset,) = run.inputs.dataset_inputs
        assert dataset.dataset.digest == dvc_hash(prepared)
        assert str(prepared.resolve()) in dataset.dataset.source
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
        assert artifacts >= {
            "evaluation/confusion_matrix.png",
            "evaluation/misclassified.png",
            "evaluation/per_class_accuracy.json",
        }
        assert [a.path for a in client.list_artifacts(run.info.run_id, "training")] == [
            "training/curves.png"
        ]


def _test_images(trained: Trained, count: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    test = open_prepared(Path(trained.params.paths.prepared)).load("test")
    return test.images[:count].astype(np.float32) / 255.0, test.labels[:count]


def test_registered_model_round_trip_pickle_free(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)
    client = _client(trained)
    name = trained.params.mlflow.registered_model
    report = json.loads((Path(trained.params.paths.reports) / "registry.json").read_text())
    champion = client.get_model_version_by_alias(name, CHAMPION)
    assert report["champion"] == str(champion.version)
    best = max(report["candidates"], key=lambda c: c["test_accuracy"])
    assert champion.tags["model_type"] == best["model_type"]
    assert champion.tags["run_id"] == trained.outcomes[best["model_type"]].spec.run_id
    assert champion.tags["data_digest"] == trained.outcomes[best["model_type"]].spec.data_digest

    images, labels = _test_images(trained)
    metadata = pull(client, name, tmp_path / "pulled", alias=CHAMPION)
    assert metadata["version"] == str(champion.version)
    assert "[0, 1]" in metadata["input_contract"]
    pulled = np.asarray(mlflow.pyfunc.load_model(str(tmp_path / "pulled")).predict(images))
    mlflow.set_tracking_uri(trained.settings.mlflow_tracking_uri)
    registered = np.asarray(mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(images))
    net, _ = load_model(Path(trained.params.paths.models) / champion.tags["model_type"])
    with torch.no_grad():
        in_memory = Probabilities(net).eval()(torch.from_numpy(images)).numpy()
    np.testing.assert_array_equal(pulled, registered)
    np.testing.assert_allclose(pulled, in_memory, rtol=0, atol=1e-6)
    assert (pulled.argmax(axis=1) == in_memory.argmax(axis=1)).all()
    assert (pulled.argmax(axis=1) == labels).mean() > 0.8


def test_pickle_models_are_refused_when_pickle_is_disabled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlflow.pytorch.save_model(
        torch.nn.Linear(2, 2), tmp_path / "pickled", serialization_format="pickle"
    )
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(Exception, match="(?i)pickle"):
        mlflow.pyfunc.load_model(str(tmp_path / "pickled"))


def test_pull_refuses_a_download_that_does_not_verify(trained: Trained, tmp_path: Path) -> None:
    client = _client(trained)
    name = trained.params.mlflow.registered_model
    version = str(client.get_model_version_by_alias(name, CHAMPION).version)
    manifest = client.get_model_version(name, version).tags[MANIFEST_TAG]
    forged = {k: "0" * 64 for k in json.loads(manifest)}
    client.set_model_version_tag(name, version, MANIFEST_TAG, json.dumps(forged))
    try:
        with pytest.raises(RegistryError, match="does not verify"):
            pull(client, name, tmp_path / "pulled", version=version)
        assert not (tmp_path / "pulled").exists()
        assert list(tmp_path.iterdir()) == []
    finally:
        client.set_model_version_tag(name, version, MANIFEST_TAG, manifest)


def _candidate_like(client: MlflowClient, version: str, name: str, accuracy: float) -> Candidate:
    """A new candidate: its own run, holding a copy of an existing version's model files."""
    source = client.get_model_version(name, version)
    run = client.create_run(client.get_run(source.run_id).info.experiment_id)
    with tempfile.TemporaryDirectory() as scratch:
        local = mlflow.artifacts.download_artifacts(
            f"models:/{name}/{version}", dst_path=scratch, tracking_uri=client.tracking_uri
        )
        client.log_artifacts(run.info.run_id, local, "model")
    client.set_terminated(run.info.run_id)
    return Candidate(
        model_type=source.tags["model_type"],
        run_id=run.info.run_id,
        model_uri=f"{run.info.artifact_uri}/model",
        test_accuracy=accuracy,
        test_loss=0.5,
        tags={MANIFEST_TAG: source.tags[MANIFEST_TAG]},
    )


def test_worse_candidate_never_takes_champion_and_rollback_restores(trained: Trained) -> None:
    client = _client(trained)
    name = trained.params.mlflow.registered_model
    incumbent = str(client.get_model_version_by_alias(name, CHAMPION).version)
    incumbent_score = float(client.get_model_version(name, incumbent).tags["test_accuracy"])

    worse = _candidate_like(client, incumbent, name, incumbent_score - 0.05)
    decision = decide_and_promote(client, name, [worse], 0.001, lambda _: incumbent_score)
    assert decision.outcome.startswith("kept the champion")
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == incumbent
    assert str(client.get_model_version_by_alias(name, "challenger").version) == decision.challenger

    # Re-running the same candidate makes no new version.
    again = decide_and_promote(client, name, [worse], 0.001, lambda _: incumbent_score)
    assert again.challenger == decision.challenger

    barely = _candidate_like(client, incumbent, name, incumbent_score + 0.0005)
    decision = decide_and_promote(client, name, [barely], 0.001, lambda _: incumbent_score)
    assert decision.outcome.startswith("kept the champion")

    better = _candidate_like(client, incumbent, name, incumbent_score + 0.01)
    decision = decide_and_promote(client, name, [better], 0.001, lambda _: incumbent_score)
    assert decision.outcome.startswith("promoted")
    promoted = str(client.get_model_version_by_alias(name, CHAMPION).version)
    assert promoted == decision.challenger != incumbent
    assert json.loads(client.get_model_version(name, promoted).tags["promotion.decision"])[
        "incumbent"
    ] == {"version": incumbent, "test_accuracy": incumbent_score}

    assert rollback(client, name) == incumbent
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == incumbent


def _race(
    trained: Trained, version: str, start: threading.Barrier, winners: dict[str, str]
) -> None:
    racer = MlflowClient(trained.settings.mlflow_tracking_uri)
    start.wait()
    winners[version] = promote(racer, trained.params.mlflow.registered_model, version, pause_s=0.05)


def test_racing_promotions_end_on_the_better_version(trained: Trained) -> None:
    name = trained.params.mlflow.registered_model
    client = _client(trained)
    incumbent = str(client.get_model_version_by_alias(name, CHAMPION).version)
    for trial in range(3):
        high = decide_and_promote(
            client,
            name,
            [_candidate_like(client, incumbent, name, 0.97 + trial * 0.001)],
            1.0,
            lambda _: 1.0,
        ).challenger
        low = decide_and_promote(
            client, name, [_candidate_like(client, incumbent, name, 0.90)], 1.0, lambda _: 1.0
        ).challenger
        winners: dict[str, str] = {}
        start = threading.Barrier(2)
        threads = [
            threading.Thread(target=_race, args=(trained, v, start, winners)) for v in (low, high)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert str(client.get_model_version_by_alias(name, CHAMPION).version) == high
        assert winners == {low: high, high: high}


def test_mlflow_models_serve_predicts_the_champion(trained: Trained, tmp_path: Path) -> None:
    name = trained.params.mlflow.registered_model
    port = free_port()
    env = os.environ | {
        "MLFLOW_TRACKING_URI": str(trained.settings.mlflow_tracking_uri),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # uvicorn
    }
    command = [
        sys.executable, "-m", "mlflow", "models", "serve",
        "-m", f"models:/{name}@champion", "--env-manager", "local",
        "-h", "127.0.0.1", "-p", str(port),
    ]  # fmt: skip
    images, labels = _test_images(trained, 50)
    mlflow.set_tracking_uri(trained.settings.mlflow_tracking_uri)
    expected = np.asarray(mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(images))
    with running(command, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", env=env):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            served = np.asarray(json.loads(reply.read())["predictions"], dtype=np.float32)
    np.testing.assert_allclose(served, expected, atol=1e-6)


def test_predict_cli_reads_any_size_image(trained: Trained, tmp_path: Path) -> None:
    client = _client(trained)
    pull(client, trained.params.mlflow.registered_model, tmp_path / "model")
    test = open_prepared(Path(trained.params.paths.prepared)).load("test")
    files = []
    for index in range(20):
        # Dark ink on white paper, 5x larger, off-centre: as a phone photo of a digit might be.
        canvas = Image.new("L", (200, 180), 255)
        digit = Image.fromarray(255 - test.images[index]).resize((140, 140))
        canvas.paste(digit, (50, 30))
        path = tmp_path / f"digit{index}.png"
        canvas.save(path)
        files.append(path)
    results = predict_files(tmp_path / "model", files)
    correct = sum(r["digit"] == int(label) for r, label in zip(results, test.labels, strict=False))
    assert correct >= 15, results


def test_predict_reports_a_refused_image_and_predicts_the_others(
    trained: Trained, tmp_path: Path
) -> None:
    client = _client(trained)
    pull(client, trained.params.mlflow.registered_model, tmp_path / "model")
    test = open_prepared(Path(trained.params.paths.prepared)).load("test")
    files = {
        "digit": tmp_path / "digit.png",
        "blank": tmp_path / "blank.png",
        "gif": tmp_path / "digit.gif",
        "jpeg": tmp_path / "digit.jpg",
    }
    Image.fromarray(255 - test.images[0]).resize((84, 84)).save(files["digit"])
    Image.new("L", (200, 150), 255).save(files["blank"])
    Image.fromarray(test.images[1]).save(files["gif"])
    Image.fromarray(test.images[2]).resize((140, 140)).save(files["jpeg"], quality=90)
    results = predict_files(tmp_path / "model", list(files.values()))
    assert [r["file"] for r in results] == [str(path) for path in files.values()]
    assert set(results[0]) == {"file", "digit", "probabilities"}
    assert set(results[3]) == {"file", "digit", "probabilities"}
    assert results[1]["kind"] == "no_digit"
    assert results[2]["kind"] == "unsupported_format"
    assert "GIF" in results[2]["error"]
    outcome = CliRunner().invoke(
        cli.app, ["predict", "--model", str(tmp_path / "model"), *map(str, files.values())]
    )
    assert outcome.exit_code == 1, outcome.output
    lines = [json.loads(line) for line in outcome.stdout.splitlines() if line.startswith("{")]
    assert [line.get("kind") for line in lines] == [None, "no_digit", "unsupported_format", None]
    assert lines[0]["digit"] == results[0]["digit"]
    good = [str(files["digit"]), str(files["jpeg"])]
    outcome = CliRunner().invoke(cli.app, ["predict", "--model", str(tmp_path / "model"), *good])
    assert outcome.exit_code == 0, outcome.output


def test_mnist_images_survive_preprocessing() -> None:
    # Already MNIST-style: white on black, centred. Preprocessing should change little.
    image = np.zeros((28, 28), dtype=np.uint8)
    image[6:22, 12:16] = 255
    processed = to_mnist(Image.fromarray(image))
    assert processed.shape == (28, 28)
    assert processed.dtype == np.float32
    assert processed.min() >= 0.0
    assert processed.max() <= 1.0
    ys, xs = np.nonzero(processed > 0.5)
    assert abs(ys.mean() - 14) < 1.5
    assert abs(xs.mean() - 14) < 1.5
    assert ys.max() - ys.min() + 1 >= 18  # scaled so the long side fills about 20 pixels


def test_unreachable_tracking_server_stops_before_training(
    params: Params, tmp_path: Path, local_ray: None
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError, match=uri.replace(".", r"\.")):
        train_model(params, "mlp", Settings(mlflow_tracking_uri=uri))
    assert not Path(params.train.storage_path).exists()
    assert not (Path(params.paths.models) / "mlp").exists()
