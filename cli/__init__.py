"""The `hsort` command line (`hypersort_core.cli`)."""

from hypersort_core.cli.main import main

__all__ = ["main"]
