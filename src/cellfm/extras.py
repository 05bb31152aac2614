"""Which optional extras (scanpy, scib-metrics, harmonypy, scvi-tools, matplotlib) are installed.

Asked by version so that a missing extra is reported by name in results, without importing it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def installed_version(package: str) -> str | None:
    """Version of an installed optional package, None when absent."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None
