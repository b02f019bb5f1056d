"""Model registry: versions for candidates, the challenger/champion aliases, and promotion.
MLflow aliases have no compare-and-set, so concurrent promotions record claims (version, score)
on the registered model and repeatedly settle the alias on the best recent one: whoever settles
last has seen every earlier claim, so the alias never ends on a version that lost."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
CLAIM_PREFIX = "claim.champion."
HISTORY_TAG = "champion.history"
CLAIM_WINDOW_S = 30.0  # far longer than a promotion takes; short enough not to surprise
SETTLE_ROUNDS = 3


class RegistryError(RuntimeError):
    """A registry operation that cannot be done; the message says why."""


@dataclass(frozen=True)
class Candidate:
    model_type: str
    run_id: str
    model_uri: str
    test_accuracy: float
    test_loss: float
    tags: dict[str, str]


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="MNIST digit classifiers")
        except MlflowException as error:  # created meanwhile by a concurrent register
            if "already exists" not in str(error).lower():
                raise


def ensure_version(client: MlflowClient, name: str, candidate: Candidate) -> ModelVersion:
    """The version holding `candidate`'s run; created only if that run has none yet."""
    ensure_registered_model(client, name)
    existing = client.search_model_versions(f"name='{name}' and run_id='{candidate.run_id}'")
    if existing:
        return existing[0]
    tags = candidate.tags | {"model_type": candidate.model_type, "run_id": candidate.run_id}
    tags |= {key: f"{getattr(candidate, key):.6f}" for key in ("test_accuracy", "test_loss")}
    source, model_id = candidate.model_uri, None
    if source.startswith("models:/m-"):  # a logged model: register its files, linked by id
        model_id = source.removeprefix("models:/")
        source = client.get_logged_model(model_id).artifact_location
    version = client.create_model_version(
        name, source=source, run_id=candidate.run_id, tags=tags, model_id=model_id
    )
    log.info("registered %s version %s (%s)", name, version.version, candidate.model_type)
    return version


def champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _history(client: MlflowClient, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    return list(json.loads(tags.get(HISTORY_TAG, "[]")))


def settle(client: MlflowClient, name: str) -> str | None:
    """Point `champion` at the best recent claim (ties: the older version); return it."""
    now = time.time()
    claims: dict[str, float] = {}
    for key, value in client.get_registered_model(name).tags.items():
        if key.startswith(CLAIM_PREFIX):
            claim = json.loads(value)
            if now - claim["at"] <= CLAIM_WINDOW_S:
                claims[key.removeprefix(CLAIM_PREFIX)] = float(claim["score"])
    current = champion(client, name)
    if not claims:
        return str(current.version) if current else None
    best = max(claims, key=lambda version: (claims[version], -int(version)))
    if current is None or str(current.version) != best:
        client.set_registered_model_alias(name, CHAMPION, best)
        history = _history(client, name)
        if history[-1:] != [best]:
            client.set_registered_model_tag(name, HISTORY_TAG, json.dumps([*history, best]))
    return best


def promote(client: MlflowClient, name: str, version: str, pause_s: float = 0.2) -> str:
    """Make `version` champion unless a concurrent promotion of a better one wins; the winner."""
    score = float(client.get_model_version(name, version).tags["test_accuracy"])
    claim = {"score": score, "at": time.time()}
    client.set_registered_model_tag(name, f"{CLAIM_PREFIX}{version}", json.dumps(claim))
    for _ in range(SETTLE_ROUNDS):
        winner = settle(client, name)
        time.sleep(pause_s * random.uniform(0.5, 1.5))
    if winner is None:  # pragma: no cover - a claim was just made
        raise RegistryError(f"{name}: champion could not be settled")
    return winner


def rollback(client: MlflowClient, name: str) -> str:
    """Champion back to the previous champion; the history keeps both."""
    history = _history(client, name)
    current = champion(client, name)
    if current is None or len(history) < 2:
        raise RegistryError(f"{name}: no previous champion to roll back to")
    previous = history[-2] if history[-1] == str(current.version) else history[-1]
    for key in client.get_registered_model(name).tags:
        if key.startswith(CLAIM_PREFIX):  # a rollback outranks pending claims
            client.delete_registered_model_tag(name, key)
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps([*history, previous]))
    client.set_model_version_tag(name, str(current.version), "rolled_back_at", str(time.time()))
    return previous


@dataclass(frozen=True)
class Decision:
    registered_model: str
    candidates: list[dict[str, Any]]
    challenger: str
    incumbent: dict[str, Any] | None
    min_improvement: float
    outcome: str
    champion: str | None


def decide_and_promote(
    client: MlflowClient,
    name: str,
    candidates: list[Candidate],
    min_improvement: float,
    score_on_test: Callable[[str], float],
) -> Decision:
    """Register every candidate, alias the best `challenger`, promote it past the gate; the
    incumbent is scored by `score_on_test` on the same images as the candidates."""
    if not candidates:
        raise RegistryError("no candidates to register")
    versions = [ensure_version(client, name, candidate) for candidate in candidates]
    ranked = sorted(zip(candidates, versions, strict=True), key=lambda pair: -pair[0].test_accuracy)
    best, best_version = ranked[0]
    chosen = str(best_version.version)
    client.set_registered_model_alias(name, CHALLENGER, chosen)
    incumbent = champion(client, name)
    incumbent_info: dict[str, Any] | None = None
    if incumbent is None:
        outcome = "promoted: there was no champion"
        winner: str | None = promote(client, name, chosen)
    elif str(incumbent.version) == chosen:
        outcome = "kept: the challenger already is the champion"
        winner = chosen
    else:
        incumbent_score = score_on_test(f"models:/{name}/{incumbent.version}")
        incumbent_info = {"version": str(incumbent.version), "test_accuracy": incumbent_score}
        margin = best.test_accuracy - incumbent_score
        if margin >= min_improvement:
            outcome = f"promoted: beats the champion by {margin:.4f} >= {min_improvement}"
            winner = promote(client, name, chosen)
        else:
            outcome = f"kept the champion: margin {margin:.4f} < {min_improvement}"
            winner = str(incumbent.version)
    if winner != chosen and outcome.startswith("promoted"):
        outcome += f"; a concurrent promotion of version {winner} won"
    listed = [
        {"model_type": c.model_type, "version": str(v.version), "run_id": c.run_id}
        | {"test_accuracy": c.test_accuracy}
        for c, v in ranked
    ]
    decision = Decision(name, listed, chosen, incumbent_info, min_improvement, outcome, winner)
    client.set_model_version_tag(name, chosen, "promotion.decision", json.dumps(asdict(decision)))
    return decision
