"""A CNN trained in-process on prepared data, logged as the pipeline does and registered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config.params import Params


def fit_plain(
    module: Any, train: Any, batch_size: int, epochs: int, callbacks: list[Any] | None = None
) -> None:
    """Fit a LightningModule on a split's arrays with a plain CPU `pl.Trainer` (no Ray)."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(
        TensorDataset(torch.from_numpy(train.images), torch.from_numpy(train.labels).long()),
        batch_size=batch_size,
        shuffle=True,
    )
    pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
    ).fit(module, loader)


def train_cnn(params: Params) -> tuple[Any, float, Any]:
    """Fit `params`' CNN on its prepared training split with a plain `pl.Trainer`; returns
    the network (eval mode), its test accuracy and a two-image input example."""
    import lightning.pytorch as pl
    import numpy as np

    from pipeline.data.prepared import open_prepared
    from pipeline.evaluate import evaluate
    from pipeline.models.module import Classifier
    from pipeline.models.networks import build_network

    data = open_prepared(Path(params.paths.prepared))
    pl.seed_everything(params.seed, verbose=False)
    config = params.train.cnn
    norm = data.normalization
    net = build_network("cnn", config.net.model_dump(), norm.mean, norm.std)
    fit_plain(Classifier(net, config), data.load("train"), config.batch_size, config.epochs)
    net.eval()
    example = data.load("val").images[:2].astype(np.float32) / 255.0
    return net, evaluate(net, data.load("test")).accuracy, example


def register_model(
    uri: str, name: str, net: Any, example: Any, accuracy: float, artifacts: Path | None = None
) -> str:
    """Log `net` in a new run as the pipeline does and register it; return the version.
    `artifacts`: the experiment's artifact folder (MLflow's default is ./mlruns)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.registry.versions import Candidate, ensure_version
    from pipeline.tracking.manifest import MANIFEST_TAG
    from pipeline.tracking.model_log import log_model
    from pipeline.tracking.runs import ensure_experiment

    client = MlflowClient(uri)
    experiment = "registered-fixture"
    if artifacts is not None and client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=artifacts.as_uri())
    ensure_experiment(uri, experiment)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        model_uri = log_model(net, example, metadata={})
    tags = client.get_run(run.info.run_id).data.tags
    candidate = Candidate(
        model_type="cnn",
        run_id=run.info.run_id,
        model_uri=model_uri,
        test_accuracy=accuracy,
        test_loss=0.0,
        tags={MANIFEST_TAG: tags[MANIFEST_TAG]},
    )
    return str(ensure_version(client, name, candidate).version)


def champion(params: Params, root: Path) -> tuple[str, Any]:
    """Train `params`' CNN, register it in a SQLite store under `root` as `@champion`;
    returns the tracking URI and the network."""
    from mlflow.tracking import MlflowClient

    from pipeline.registry.versions import promote

    net, accuracy, example = train_cnn(params)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    name = params.mlflow.registered_model
    version = register_model(uri, name, net, example, accuracy, root / "artifacts")
    promote(MlflowClient(uri), name, version, pause_s=0.0)
    return uri, net
