"""A curator's decisions about training cases, kept in RUN/review.csv: what `hsort review` records and
`hsort curate` applies.

One row per case (`case, decision, style, note, reviewer, time`); a later decision about a case
replaces the earlier one. Each decision is merged into the file under a lock (one in this process,
and an advisory file lock for other processes) and the file is rewritten atomically, so two browser
tabs, or two servers on one run, never lose each other's decisions and a kill never leaves half a file.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from hypersort_core.atomic import atomic_write_csv
from hypersort_core.data import DataError

REVIEW_NAME = "review.csv"
COLUMNS = ("case", "decision", "style", "note", "reviewer", "time")
USE_PREDICTION = "use_prediction"  # wrong label: the chosen style's prediction replaces it
EXCLUDE = "exclude"  # wrong label: the case is left out
HARD_BUT_CORRECT = "hard_but_correct"
FINE = "fine"
DECISIONS = {
    USE_PREDICTION: "wrong: use prediction",
    EXCLUDE: "wrong: exclude",
    HARD_BUT_CORRECT: "hard but correct",
    FINE: "fine",
}
MAIN_STYLE = "lambda0"  # the style names of styles.py: lambda0 and cluster_K
MAX_NOTE_CHARACTERS = 2000

_in_process = threading.Lock()


@dataclass(frozen=True)
class Decision:
    case: str
    decision: str
    style: str  # the style whose prediction replaces the label (use_prediction only), else ""
    note: str
    reviewer: str
    time: str  # UTC, ISO 8601


def decision_problem(decision: str, style: str) -> str | None:
    """What is wrong with a decision and its style, or None."""
    if decision not in DECISIONS:
        return f"unknown decision {decision!r} (one of {', '.join(DECISIONS)})"
    if decision == USE_PREDICTION and not is_style_name(style):
        return f"decision {USE_PREDICTION} needs a style ({MAIN_STYLE} or cluster_K), got {style!r}"
    return None


def is_style_name(style: str) -> bool:
    number = style.removeprefix("cluster_")
    return style == MAIN_STYLE or (number != style and number.isdigit())


def new_decision(case: str, decision: str, style: str = "", note: str = "", reviewer: str = "") -> Decision:
    """A decision made now; a bad decision or style is a ValueError."""
    problem = decision_problem(decision, style)
    if problem is not None:
        raise ValueError(problem)
    time = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return Decision(case, decision, style if decision == USE_PREDICTION else "", note[:MAX_NOTE_CHARACTERS], reviewer, time)


def read_decisions(path: Path, case_ids: list[str] | None = None) -> dict[str, Decision]:
    """The decisions of a review.csv by case; a missing file holds none. Every problem (a missing column,
    an unknown decision or case) is a DataError naming the file and the row."""
    if not path.exists():
        return {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(path, f"cannot read it ({error})") from error
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
    except csv.Error as error:
        raise DataError(path, f"cannot parse it ({error})") from error
    if not text.strip():
        return {}
    header = next(csv.reader(io.StringIO(text)))
    missing = [column for column in ("case", "decision") if column not in header]
    if missing:
        raise DataError(path, f"has no {' or '.join(missing)} column (found: {', '.join(header)})")
    known = set(case_ids) if case_ids is not None else None
    decisions = {}
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        if None in row:
            raise DataError(path, f"row {number} has more cells than the header")
        values = {column: (row.get(column) or "").strip() for column in COLUMNS}
        problem = decision_problem(values["decision"], values["style"])
        if problem is not None:
            raise DataError(path, f"row {number}: {problem}")
        if known is not None and values["case"] not in known:
            raise DataError(path, f"row {number}: {values['case']!r} is not a training case of the run")
        decisions[values["case"]] = Decision(**values)
    return decisions


def write_decisions(path: Path, decisions: dict[str, Decision]) -> None:
    atomic_write_csv(path, [COLUMNS, *(asdict(decision).values() for decision in decisions.values())])


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the review file's lock: the thread lock of this process, then an advisory lock on a file beside it."""
    with _in_process, open(path.with_name(f".{path.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_decision(path: Path, decision: Decision) -> dict[str, Decision]:
    """Merge one decision into the file (replacing that case's earlier one); returns every decision now in it."""
    with locked(path):
        decisions = read_decisions(path)
        decisions[decision.case] = decision
        write_decisions(path, decisions)
        return decisions
