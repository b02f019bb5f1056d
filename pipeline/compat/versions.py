"""The version guard every compatibility module uses."""

from __future__ import annotations

from importlib.metadata import version

from packaging.version import Version


class CompatError(RuntimeError):
    """An installed library is outside the versions a workaround was written for."""


def require(package: str, low: str, high: str) -> None:
    """Stop, naming `package` and its version, unless `low` <= installed < `high`."""
    installed = version(package)
    if not Version(low) <= Version(installed) < Version(high):
        raise CompatError(
            f"{package} {installed} is installed; the workaround in pipeline/compat was "
            f"written for {package} >={low},<{high}: check it against this release and update "
            "its range"
        )
