"""Thousands of cases: peak memory stays flat as the case count grows (the figures are in the README),
and the prepared cases are reused by every later run with the same settings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hypersort_core.data import make_synthetic_dataset

TESTS = Path(__file__).parent
# Tiny cases and a tiny UNet: what grows with the case count is the bookkeeping, which is what this measures.
FIT = [
    "--preset",
    "small",
    "--base-channels",
    "2",
    "--levels",
    "1",
    "--convs-per-level",
    "1",
    "--roi",
    "16",
    "--batch-size",
    "8",
    "--epochs",
    "1",
    "--workers",
    "2",
    "--no-analyze",
    "--quiet",
]
# Measured on the 2-core CI machine: 200 -> 2,000 cases adds 15 MiB to the `hsort fit` process (the check and
# the bookkeeping of 1,800 more cases; it added 37 MiB while latents.csv computed an N x N distance matrix)
# and 3 MiB to the largest worker.
ALLOWED_GROWTH_MIB = 24


def peak_memory(data: Path, run_dir: Path, cache: Path) -> dict:
    command = [sys.executable, "peak_memory.py", "fit", str(data), "--out", str(run_dir), "--cache", str(cache), *FIT]
    result = subprocess.run(command, cwd=TESTS, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("scale")
    return {cases: make_synthetic_dataset(root / f"cases{cases}", cases=cases, size=16, perturbed=0.1, seed=cases) for cases in (200, 2000)}


def test_peak_memory_stays_flat_from_200_to_2000_cases(datasets, tmp_path):
    small, large = (peak_memory(datasets[n], tmp_path / f"run{n}", tmp_path / f"cache{n}") for n in (200, 2000))
    print(f"peak memory, 200 cases: {small}; 2,000 cases: {large}")
    assert large["main_mib"] - small["main_mib"] < ALLOWED_GROWTH_MIB
    assert large["largest_child_mib"] - small["largest_child_mib"] < ALLOWED_GROWTH_MIB


def test_a_second_run_with_the_same_settings_reuses_the_prepared_cases(datasets, tmp_path):
    cache = tmp_path / "cache"
    peak_memory(datasets[200], tmp_path / "first", cache)
    entries = sorted(path.name for path in cache.rglob("*.json"))
    stamps = {path: path.stat().st_mtime_ns for path in cache.rglob("*.npy")}
    peak_memory(datasets[200], tmp_path / "second", cache)
    assert sorted(path.name for path in cache.rglob("*.json")) == entries and len(entries) == 2 * 200  # per case: its prepared entry, its findings
    assert {path: path.stat().st_mtime_ns for path in cache.rglob("*.npy")} == stamps  # nothing prepared again
    assert json.loads((tmp_path / "second" / "config.json").read_text())["cache"] == str(cache.resolve())
