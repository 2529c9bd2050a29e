"""What CLI tests check of a refused input, and how they watch a training run in another process."""

import csv
import time

import pytest


def assert_one_line_error(result, names):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hsort: error: ")
    assert str(names) in lines[0]


def logged_epochs(run) -> list[int]:
    try:
        with open(run / "log.csv", newline="") as handle:
            return [int(row["epoch"]) for row in csv.DictReader(handle)]
    except FileNotFoundError:
        return []


def wait_for(condition, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for training to progress")
        time.sleep(0.2)
