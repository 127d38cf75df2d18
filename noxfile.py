"""nox sessions: tests, lint, typecheck, bench, demo, cpp. CI runs lint, typecheck, tests.

Sessions reuse the current environment (``venv_backend="none"``): .ci/run installs the
project once, with the pinned CPU torch wheel, and every session runs against it.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.default_venv_backend = "none"

PACKAGES = ["toolkit", "exporters", "reports"]
SOURCES = [*PACKAGES, "tests", "benchmarks", "examples", "data/physics.py", "noxfile.py"]


@nox.session
def tests(session: nox.Session) -> None:
    """Unit and CLI tests, the C++ example's build included (GPU tests skip without CUDA)."""
    session.run("pytest", "-q", *session.posargs)


@nox.session
def cpp(session: nox.Session) -> None:
    """Build examples/cpp (ONNX Runtime + libtorch) and compare it with Python."""
    session.run("pytest", "-q", "-m", "cpp", "tests/test_cpp_example.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.run("ruff", "check", *SOURCES)
    session.run("ruff", "format", "--check", *SOURCES)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy on the three packages."""
    session.run("mypy", *PACKAGES)


@nox.session
def bench(session: nox.Session) -> None:
    """Speed and accuracy benchmarks; each prints ratios against an in-process baseline."""
    import pathlib

    for script in sorted(pathlib.Path("benchmarks").glob("[!_]*.py")):
        session.log(f"== {script}")
        session.run("python", str(script), *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The whole pipeline on the bundled dataset."""
    session.run("latkit", "demo", *session.posargs)
