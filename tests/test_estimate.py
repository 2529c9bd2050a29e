"""Before training, `hsort fit` estimates the time per epoch and the peak memory from one real step, and
refuses (one line, exit code 2) a run whose peak would exceed the free memory, unless --force."""

from click.testing import CliRunner
from tiny_runs import tiny_config

from hypersort_core import estimate
from hypersort_core.cli.main import main
from hypersort_core.estimate import estimate_fit, extrapolate, scaled_roi

FAST = ["--preset", "small", "--roi", "16", "--base-channels", "4", "--epochs", "1", "--no-analyze", "--quiet"]


def test_the_estimate_times_a_real_step_and_measures_its_memory(synthetic_dataset, one_torch_thread):
    found = estimate_fit(synthetic_dataset, tiny_config())
    assert found.steps_per_epoch == 3  # 7 cases, batch 3
    assert found.step_seconds > 0 and found.fits
    assert 100 * 2**20 < found.peak_bytes <= found.available_bytes  # the process itself, with PyTorch loaded
    assert "estimated time per epoch on this CPU" in found.describe()


def test_a_run_that_would_not_fit_in_memory_stops_before_training_in_one_line(synthetic_dataset, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setattr(estimate, "available_memory_bytes", lambda: 1)  # nothing free beyond what the process holds
    taken = []
    step = estimate.measured_step
    monkeypatch.setattr(estimate, "measured_step", lambda *args: taken.append(args[-1]) or step(*args))
    result = CliRunner().invoke(main, ["fit", str(synthetic_dataset), "--out", str(tmp_path / "run"), *FAST])
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]  # the check's warnings come first
    assert "GiB is free" in line and "--force" in line and "--roi" in line
    assert (16, 16, 16) not in taken  # the full-size step was never taken
    assert not (tmp_path / "run" / "checkpoint.pt").exists()

    forced = CliRunner().invoke(main, ["fit", str(synthetic_dataset), "--out", str(tmp_path / "run"), *FAST, "--force"])
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_probe_sizes_are_valid_rois_and_memory_grows_along_their_line():
    assert scaled_roi((168, 168, 168), 0.25, 8, 16) == (40, 40, 40)
    assert scaled_roi((168, 160, 32), 0.5, 8, 16) == (80, 80, 16)
    assert extrapolate(1000, 10.0, 8000, 80.0, 64000) == 640.0
    assert extrapolate(1000, 10.0, 1000, 12.0, 64000) == 12.0  # one probe size: no slope to follow
