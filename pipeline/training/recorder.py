"""Ray Train's controller-side callback, apart from the driver: the controller unpickles it
before the workers start, and must not import Lightning or the worker code (bench/README.md)."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.train import UserCallback

from pipeline.tracking.epochs import count_restart, log_new_epochs

log = logging.getLogger(__name__)

CONTROLLER_MLFLOW_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


class RunRecorder(UserCallback):
    """Each epoch into the MLflow run once its checkpoint is committed (so an epoch redone after
    a failure is logged once), and each restart Ray makes."""

    def __init__(self, uri: str, run_id: str, max_failures: int) -> None:
        self.uri = uri
        self.run_id = run_id
        self.max_failures = max_failures
        self.failures = 0
        self.pending: list[dict[str, Any]] = []

    @functools.cached_property  # set up once, in the controller: the driver only pickles it
    def client(self) -> MlflowClient:
        # Ray's controller loop also watches the workers: one quick try, not MLflow's minutes of
        # retries; an epoch missed here is logged by the driver when training ends.
        os.environ.update(CONTROLLER_MLFLOW_ENV)
        return MlflowClient(self.uri)

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        if checkpoint is None:
            return
        # Epochs that missed MLflow go with the next one, so that steps stay in order.
        self.pending.append(metrics[0])
        try:
            log_new_epochs(self.client, self.run_id, self.pending)
            self.pending.clear()
        except (MlflowException, OSError) as error:
            # Not fatal: the driver logs every epoch the run lacks when training ends.
            log.warning("epoch %s not logged yet: %s", metrics[0].get("epoch"), error)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        self.failures += 1
        if self.failures > self.max_failures:  # as Ray's FailureConfig decides: no restart
            return
        try:
            count_restart(self.client, self.run_id)
        except (MlflowException, OSError) as error:
            # Never let bookkeeping stop the restart itself.
            log.warning("restart %d not recorded: %s", self.failures, error)
