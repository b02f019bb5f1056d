"""Each workaround of `pipeline.compat.ray` on the installed Ray, and its version guard; no
cluster needed."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import ray
from ray.exceptions import ActorDiedError
from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from pipeline.compat import ray as compat


@pytest.mark.parametrize("version", ["2.59.3", "2.61.0", "3.60.0"])
def test_the_guard_refuses_a_ray_it_was_not_written_for(version: str) -> None:
    with pytest.raises(RuntimeError) as caught:
        compat.require_ray(version)
    assert str(caught.value) == (
        f"pipeline.compat: written for ray >=2.60,<2.61; installed ray {version}"
    )


def test_the_guard_passes_the_installed_ray_and_guards_each_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compat.require_ray()
    compat.require_ray("2.60.7")
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    with pytest.raises(RuntimeError, match="installed ray 2.61.0"):
        compat.head_node()
    with pytest.raises(RuntimeError, match="installed ray 2.61.0"):
        compat.health_check_cause(RuntimeError("x"))


def test_head_node_asks_for_the_resource_only_the_head_has() -> None:
    # The name Ray's autoscaler looks for on the head (ray/autoscaler/v2/utils.py).
    assert compat.head_node() == {"node:__internal_head__": 0.001}


def _asha(mode: str) -> ASHAScheduler:
    return ASHAScheduler(
        time_attr="t",
        metric="m",
        mode=mode,
        max_t=4,
        grace_period=1,
        reduction_factor=2,
        brackets=1,
    )


@pytest.mark.parametrize(
    ("mode", "earlier", "weak"), [("max", [0.9, 0.8], 0.1), ("min", [0.1, 0.2], 0.9)]
)
def test_replayed_results_fill_the_rungs_of_a_restored_asha(
    mode: str, earlier: list[float], weak: float
) -> None:
    def stops_the_weak_trial(replayed: bool) -> bool:
        scheduler = _asha(mode)
        trials = [SimpleNamespace(trial_id=name) for name in ("a", "b", "c")]
        for trial in trials:
            scheduler.on_trial_add(None, trial)  # type: ignore[arg-type]
        if replayed:
            for trial, value in zip(trials, earlier, strict=False):
                compat.replay_asha(scheduler, trial, [(1, value)])  # type: ignore[arg-type]
        action = scheduler.on_trial_result(None, trials[2], {"t": 1, "m": weak})  # type: ignore[arg-type]
        return bool(action == TrialScheduler.STOP)

    assert not stops_the_weak_trial(replayed=False), "alone in its rung, nothing to compare"
    assert stops_the_weak_trial(replayed=True)


def test_a_health_check_failure_is_unwrapped_to_its_cause() -> None:
    died = ActorDiedError()
    assert compat.health_check_cause(WorkerHealthCheckFailedError("check failed", died)) is died
    other = RuntimeError("boom")
    assert compat.health_check_cause(other) is other


def test_the_placement_group_of_a_started_worker_group_is_handed_on() -> None:
    group = object()
    seen: list[Any] = []

    class Seen(compat.PlacementGroupStarted):
        def started(self, group: Any) -> None:
            seen.append(group)

    handle = SimpleNamespace(placement_group=group)
    state = SimpleNamespace(placement_group_handle=handle)
    Seen().after_worker_group_start(SimpleNamespace(get_worker_group_state=lambda: state))
    assert seen == [group]
