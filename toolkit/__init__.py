"""latkit: learn the latency of adaptive vision-language inference from profiling data."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("latkit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
