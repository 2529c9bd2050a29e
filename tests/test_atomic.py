"""Output files appear whole or not at all, readable like any other file."""

import os
import stat

import pytest

from hypersort_core.atomic import atomic_open, atomic_write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "latents.csv"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(path) as handle:
        handle.write("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["latents.csv"]


def test_outputs_get_the_mode_the_umask_allows_not_a_private_one(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.html", "<html></html>")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == 0o644
