"""Faults of the machine a user can cause (a full disk, a read-only or vanished folder, a name too long, a
signal): recognised wherever they come from, so that every command reports them in one line.

Foreign code wraps some of them: torch's zip writer turns the OSError of a failed write (ENOSPC above
all) into `RuntimeError: [enforce fail at inline_container.cc...] unexpected pos`, with the OSError as
its context.  `os_error_of` finds the OSError behind such a wrapper; `describe_os_error` words it.
With several training processes, rank 0's failure is the others' fault: `MainProcessStopped`.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path


class MainProcessStopped(RuntimeError):
    """Under torchrun: rank 0 failed (and reports why); this process stops with it, with nothing of its own to report."""


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Messages of foreign exceptions that only wrap an OSError raised while they wrote or read a file.
FOREIGN_WRAPPERS = ("inline_container.cc", "PytorchStreamWriter", "PytorchStreamReader", "unexpected pos")
CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "file name too long for the file system",
    errno.ENOENT: "no such file or folder (was it deleted or moved?)",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EIO: "input/output error (a failing disk or a lost network file system)",
    errno.EMFILE: "too many open files (raise `ulimit -n`)",
    errno.ENOMEM: "not enough memory",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler, `kill`), raised in the main thread as Ctrl-C is, so that every `finally`
    and every worker pool's shutdown runs; the command then exits with 128 + the signal's number."""

    signum = signal.SIGTERM


def exit_code_of_signal(signum: int) -> int:
    """The shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within: SIGTERM raises Terminated in the main thread instead of ending the process on the spot (which
    would leave worker processes behind and skip every `finally`); a no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def os_error_of(error: BaseException) -> OSError | None:
    """The OSError an exception is, or that a known foreign wrapper (torch's serialization) was raised
    while handling; None for anything else (a bug must stay visible)."""
    if isinstance(error, OSError):
        return error
    if isinstance(error, RuntimeError) and any(marker in str(error) for marker in FOREIGN_WRAPPERS):
        seen = set()
        inner = error.__cause__ or error.__context__
        while inner is not None and id(inner) not in seen:
            if isinstance(inner, OSError):
                return inner
            seen.add(id(inner))
            inner = inner.__cause__ or inner.__context__
        return OSError(errno.EIO, "a write or read of the file failed")
    return None


def is_no_space(error: BaseException) -> bool:
    found = os_error_of(error)
    return found is not None and found.errno in NO_SPACE_ERRNOS


def cause_of(error: OSError) -> str:
    """A short, lower-case cause: 'no space left on the device', 'permission denied', ..."""
    if error.errno in CAUSES:
        return CAUSES[error.errno]
    return (error.strerror or str(error) or type(error).__name__).lower()


def describe_os_error(error: OSError, path: Path | str | None = None) -> str:
    """'PATH: cause' for the file the error names (else `path`)."""
    named = error.filename if error.filename is not None else path
    if error.errno is None and error.strerror is None:  # an OSError raised with our own message
        return str(error.args[0]) if len(error.args) == 1 else str(error)
    cause = cause_of(error)
    if named is None:
        return cause
    if error.filename2 is not None:
        return f"{named} -> {error.filename2}: {cause}"
    return f"{named}: {cause}"


def warn(message: str) -> None:
    print(f"hsort: warning: {message}", file=sys.stderr, flush=True)
