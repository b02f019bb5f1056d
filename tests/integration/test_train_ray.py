"""Ray Train: a real 2-worker CPU run on a real subset."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from ray.train import Result
from ray.train.lightning import RayTrainReportCallback

from pipeline.config.params import Params
from pipeline.data.prepared import open_prepared
from pipeline.evaluate import predict_proba
from pipeline.models.artifact import load_model, state_dict_from_lightning
from pipeline.training.driver import train_model
from tests.conftest import local_store


@pytest.mark.slow
def test_two_workers_shard_checkpoint_and_export(
    params: Params, local_ray: None, tmp_path: Path
) -> None:
    outcome = train_model(params, "mlp", local_store(tmp_path), run_name="test-mlp")
    train_size = open_prepared(Path(params.paths.prepared)).sizes["train"]
    assert train_size == params.prepare.train_limit - params.prepare.val_size  # type: ignore[operator]

    # Every epoch: each worker saw its own half, together exactly the split.
    assert [int(row["epoch"]) for row in outcome.history] == list(range(params.train.mlp.epochs))
    for row in outcome.history:
        assert row["train/samples_rank0"] == row["train/samples_rank1"] == train_size / 2
        assert row["train/samples"] == train_size
    assert outcome.spec.val_accuracy > 0.8
    assert outcome.runtime["backend"] == "gloo"
    assert outcome.runtime["precision"] == "32-true"
    assert outcome.runtime["torch_threads"] == params.train.scaling.cpus_per_worker
    assert outcome.runtime["world_size"] == 2
    assert outcome.spec.val_accuracy == max(row["val/accuracy"] for row in outcome.history)

    # The best Ray checkpoint reloads to the same predictions as the exported model.
    best = Result.from_path(outcome.run_path).get_best_checkpoint("val/accuracy", "max")
    assert best is not None
    with best.as_directory() as folder:
        state, epoch = state_dict_from_lightning(
            Path(folder) / RayTrainReportCallback.CHECKPOINT_NAME
        )
    assert epoch == outcome.spec.epoch
    from_checkpoint = outcome.spec.build()
    from_checkpoint.load_state_dict(state)
    exported, spec = load_model(Path(params.paths.models) / "mlp")
    assert spec.data_digest == open_prepared(Path(params.paths.prepared)).digest
    test_images = open_prepared(Path(params.paths.prepared)).load("test").images
    np.testing.assert_array_equal(
        predict_proba(from_checkpoint, test_images), predict_proba(exported, test_images)
    )

    with (Path(params.paths.plots) / "mlp" / "history.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [float(r["val/accuracy"]) for r in rows] == pytest.approx(
        [row["val/accuracy"] for row in outcome.history], abs=1e-6
    )
