"""Integration tests: real training, servers, Ray clusters, DVC and a browser (minutes). All
of them are `slow`, so `pytest -m "not slow"` (`make test-fast`) runs the unit tests alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.stack import Stack, running_stack

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The deployed stack (PostgreSQL, SeaweedFS, MLflow with basic auth) for the session."""
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running
