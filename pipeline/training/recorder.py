"""Ray Train's controller-side callback: each committed epoch and each restart into the
training's MLflow run.

Apart from the driver: Ray Train's controller unpickles this callback before it starts the
workers, and must not import Lightning or the worker code for it (bench/README.md).
"""

from __future__ import annotations

import logging
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.train import UserCallback

from pipeline.tracking.epochs import count_restart, log_new_epochs

log = logging.getLogger(__name__)


class RunRecorder(UserCallback):
    """Runs in Ray Train's controller: writes each epoch into the MLflow run once Ray has
    committed that epoch's checkpoint, and counts the restarts Ray makes.

    Logging only committed epochs is what keeps steps unique: an epoch cut short by a failure
    is redone from the previous checkpoint and logged once, when it completes.
    """

    def __init__(self, uri: str, run_id: str, max_failures: int) -> None:
        self.uri = uri
        self.run_id = run_id
        self.max_failures = max_failures
        self.failures = 0

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        if checkpoint is None:
            return
        try:
            log_new_epochs(MlflowClient(self.uri), self.run_id, [metrics[0]])
        except (MlflowException, OSError) as error:
            # Not fatal: the driver logs every epoch the run lacks when training ends.
            log.warning("epoch %s not logged yet: %s", metrics[0].get("epoch"), error)

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        self.failures += 1
        if self.failures > self.max_failures:  # as Ray's FailureConfig decides: no restart
            return
        try:
            count_restart(MlflowClient(self.uri), self.run_id)
        except (MlflowException, OSError) as error:
            # Never let bookkeeping stop the restart itself.
            log.warning("restart %d not recorded: %s", self.failures, error)
