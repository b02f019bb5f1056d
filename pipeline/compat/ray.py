"""Ray's private APIs the project uses, each behind `require_ray`: written for ray >=2.60,<2.61.

Not here, as Ray 2.60 has a public way: Serve's late-bound ingress (`serve.ingress()` plus
`__serve_build_asgi_app__`, documented in `serve.ingress`'s docstring), used by ray_app.py."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import ray
from ray._common.constants import HEAD_NODE_RESOURCE_NAME
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.util.placement_group import PlacementGroup

from pipeline.compat.versions import require

if TYPE_CHECKING:  # Tune only for its types: the train stage imports this module too
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import ASHAScheduler

WRITTEN_FOR = ("2.60", "2.61")  # [min, max): the releases whose source these uses were read in


def require_ray(installed: str | None = None) -> None:
    """Refuse to run a workaround on a Ray it was not written for (its internals move)."""
    require("ray", *WRITTEN_FOR, installed=installed or ray.__version__)


def head_node(share: float = 0.001) -> dict[str, float]:
    """A resource request only the head node meets. Why: Ray's own drivers (Serve's controller)
    pin themselves to the head this way; no public constant (ray/_common/constants.py:5)."""
    require_ray()
    return {HEAD_NODE_RESOURCE_NAME: share}


class PlacementGroupStarted(WorkerGroupCallback):
    """Train callback: `started(group)` with each worker group's placement group. Why: a Train
    V2 run stopped by Tune can leave its placement group behind, and no public callback sees it
    (https://github.com/ray-project/ray/pull/58515, Ray's own cleaner, which needs the dashboard;
    https://github.com/ray-project/ray/issues/65443). Ray runs such internal callbacks given in
    RunConfig.callbacks (ray/train/v2/api/data_parallel_trainer.py:258)."""

    def after_worker_group_start(self, worker_group: Any) -> None:
        require_ray()
        handle = worker_group.get_worker_group_state().placement_group_handle
        self.started(handle.placement_group)

    def started(self, group: PlacementGroup) -> None:
        raise NotImplementedError


def replay_asha(
    scheduler: ASHAScheduler, trial: Trial, results: Iterable[tuple[int, float]]
) -> None:
    """Record a restored trial's (time, metric) results in its ASHA bracket, as they came. Why:
    Tune does not save scheduler state, so a restored ASHA has empty rungs
    (https://github.com/ray-project/ray/issues/30838); a bracket is only reachable through
    `_trial_info`, the metric's sign through `_metric_op`
    (ray/tune/schedulers/async_hyperband.py:82-159)."""
    require_ray()
    bracket = scheduler._trial_info[trial.trial_id]
    sign = scheduler._metric_op or 1.0
    for done, value in results:
        bracket.on_result(trial, done, sign * value)


def health_check_cause(error: Exception) -> Exception:
    """The error inside a worker failure Ray's health check found, else `error`. Why: Train V2
    wraps a dead worker's ActorDiedError in its internal WorkerHealthCheckFailedError, not
    exported by `ray.train`; Ray's own code unwraps it the same way (the attribute set in
    ray/train/v2/_internal/exceptions.py:39, read in
    ray/train/v2/_internal/execution/worker_group/poll.py:26-27)."""
    require_ray()
    inner = getattr(error, "health_check_failure", None)
    return inner if isinstance(inner, Exception) else error
