"""Atomic file writes: a crash, kill or Ctrl-C leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO

from hypersort_core.faults import os_error_of


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "w", previous: Path | str | None = None) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success fsync it and rename it over `path`.

    With `previous`, the old `path` is first renamed to `previous`: the new file is complete on
    disk before either rename, so at every moment `path` or `previous` is a complete file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _default_file_mode())  # mkstemp makes files private; outputs are for everyone the umask allows
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        found = os_error_of(error) if isinstance(error, Exception) else None  # also behind torch's RuntimeError
        if found is not None and found.filename is None:
            found.filename = str(path)  # a failed write() names no file; the user needs to know which
        raise
    _fsync_directory(path.parent)


def _default_file_mode() -> int:
    """0o666 less the process umask: the mode an ordinary open() would have given the file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_csv(path: Path | str, rows: Iterable[Sequence], **dialect) -> None:
    """CSV rows, the header first, written atomically; `dialect`: csv.writer's options (delimiter=...)."""
    buffer = io.StringIO()
    csv.writer(buffer, **dialect).writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def atomic_savefig(path: Path | str, figure) -> None:
    """Save a matplotlib figure atomically (the format comes from the final name's suffix)."""
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format=path.suffix.lstrip("."), dpi=110, bbox_inches="tight")
