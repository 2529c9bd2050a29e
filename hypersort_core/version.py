"""The installed version, written into every run folder's config.json."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hypersort-core")
except PackageNotFoundError:
    __version__ = "0.0.0+unknown"
