"""What the `hsort` commands share: the bad-input convention and option parsers."""

from __future__ import annotations

import functools
import os
import signal
import sys
import traceback

import click

from hypersort_core.config import DEVICES, PRESETS

BAD_INPUT_EXIT = 2  # bad input, and faults of the machine (full disk, permissions, ...)
INTERNAL_ERROR_EXIT = 1  # a bug: the traceback is shown


def _bad_input_errors() -> tuple[type[Exception], ...]:
    from hypersort_core.checkpoint import CheckpointError
    from hypersort_core.config import ConfigError
    from hypersort_core.data import DataError

    return DataError, CheckpointError, ConfigError


def reports_bad_input(command):
    """The error boundary of every command: the library's input errors and the machine's faults (a full
    disk, a read-only or vanished folder, a name too long: any OSError, and the foreign errors that only
    wrap one) become one line naming the path and the cause, exit code 2; Ctrl-C exits with 130 and
    SIGTERM with 143, without a traceback.  Anything else is a bug: its traceback is shown, with a hint."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from hypersort_core.faults import MainProcessStopped, Terminated, describe_os_error, exit_code_of_signal, os_error_of, sigterm_raises

        try:
            with sigterm_raises():
                return command(*args, **kwargs)
        except MainProcessStopped:  # rank 0 prints the error and returns its exit code; failing here first would hide it
            _leave(0)
        except _bad_input_errors() as error:
            _fail(str(error))
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise  # click's own: a usage error is its own message and exit code
        except KeyboardInterrupt as interrupt:
            signum = interrupt.signum if isinstance(interrupt, Terminated) else signal.SIGINT
            click.echo(f"hsort: {'terminated' if isinstance(interrupt, Terminated) else 'interrupted'}", err=True)
            _leave(exit_code_of_signal(signum))
        except Exception as error:
            found = os_error_of(error)
            if found is None:
                traceback.print_exc()
                click.echo(f"hsort: internal error ({type(error).__name__}); this is a bug, please report it with the traceback above", err=True)
                _leave(INTERNAL_ERROR_EXIT)
            _fail(describe_os_error(found))

    return wrapper


def _fail(message: str) -> None:
    click.echo(f"hsort: error: {message.replace(chr(10), ' ')}", err=True)
    _leave(BAD_INPUT_EXIT)


def _leave(code: int) -> None:
    """sys.exit, except in one of several training processes: there the interpreter's teardown can meet the
    process group's threads still talking to a process that has gone, and abort (C++ terminate, exit 134,
    after the one-line error was printed), so the process leaves at once, its output flushed.  What it wrote
    is safe: checkpoints and outputs are written atomically, before this point."""
    from hypersort_core.distributed import world_from_environment

    if world_from_environment().size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


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


def error_kinds(ctx, param, value: str) -> tuple[str, ...]:
    """--kinds: 'all' or a comma-separated list of label_errors.ERROR_KINDS."""
    from hypersort_core.data.label_errors import ERROR_KINDS

    kinds = tuple(ERROR_KINDS) if value.strip() == "all" else tuple(kind.strip() for kind in value.split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in ERROR_KINDS]
    if unknown or not kinds:
        raise click.BadParameter(f"unknown kind(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(ERROR_KINDS)} or 'all'")
    return kinds


def device_option(default: str | None = "auto", help: str | None = None):
    """--device, one of the library's DEVICES."""
    return click.option("--device", type=click.Choice(DEVICES), default=default, show_default=default is not None, help=help)


def preset_option(default: str | None, help: str):
    """--preset, one of the library's PRESETS."""
    return click.option("--preset", type=click.Choice(list(PRESETS)), default=default, show_default=default is not None, help=help)
