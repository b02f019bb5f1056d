"""Integration tests: real training, servers, Ray clusters, DVC and a browser (minutes). All
of them are `slow`, so `pytest -m "not slow"` (`make test-fast`) runs the unit tests alone."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.slow)
