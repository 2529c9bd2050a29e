"""What the `hsort` commands share: the bad-input convention and option parsers."""
from __future__ import annotations

import functools
import sys

import click

BAD_INPUT_EXIT = 2


def _bad_input_errors() -> tuple[type[Exception], ...]:
    from hypersort_core.checkpoint import CheckpointError
    from hypersort_core.config import ConfigError
    from hypersort_core.data import DataError

    return DataError, CheckpointError, ConfigError, FileNotFoundError


def reports_bad_input(command):
    """Turn the library's input errors into one clear line and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except _bad_input_errors() as error:
            click.echo(f"hsort: error: {error}", err=True)
            sys.exit(BAD_INPUT_EXIT)

    return wrapper


def triple(kind: type):
    """Parse '2' or '2,2,3' into a 3-tuple."""

    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            parts = [kind(v) for v in value.split(",")]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a number or three comma-separated numbers") from None
        if len(parts) not in (1, 3):
            raise click.BadParameter(f"{value!r}: give one value or three")
        return tuple(parts * 3 if len(parts) == 1 else parts)

    return parse


def comma_list(kind: type):
    """Parse 'a,b,c' into a tuple of kind."""

    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return tuple(kind(v.strip()) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of {kind.__name__} values") from None

    return parse
