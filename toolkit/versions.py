"""Versions of the installed packages, as run logs and evaluations record them."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version


def installed_versions(packages: Sequence[str]) -> dict[str, str]:
    """Python's version and each installed package's (from its metadata: nothing is imported;
    a package that is not installed is left out)."""
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found
