"""The version guard every compatibility module uses."""

from __future__ import annotations

from importlib.metadata import version

from packaging.version import Version


def require(package: str, low: str, high: str, installed: str | None = None) -> None:
    """Stop, naming `package` and its version, unless `low` <= installed < `high`: the
    workaround was written against those releases' source, and internals move."""
    installed = installed or version(package)
    if not Version(low) <= Version(installed) < Version(high):
        raise RuntimeError(
            f"pipeline.compat: written for {package} >={low},<{high}; "
            f"installed {package} {installed}"
        )
