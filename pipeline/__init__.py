"""immuneage: single-cell immune profiling of longitudinal exercise cohorts."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("immuneage")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
