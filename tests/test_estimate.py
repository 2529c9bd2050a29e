"""Before training, `hsort fit` estimates the time per epoch and the peak memory from one real step, and
refuses (one line, exit code 2) a run whose peak would exceed the free memory, unless --force."""

import math
import os
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from tiny_runs import tiny_config

import hypersort_core as hs
from hypersort_core import estimate
from hypersort_core.cli.main import main
from hypersort_core.config import ConfigError
from hypersort_core.estimate import StepMemory, allocated_bytes, estimate_fit, extrapolate, measured_step, predicted_peak, scaled_roi
from hypersort_core.model import HyperSORT
from hypersort_core.train import Trainer, build_optimizers

FAST = ["--preset", "small", "--roi", "16", "--base-channels", "4", "--epochs", "1", "--no-analyze", "--quiet"]


def test_the_estimate_times_a_real_step_and_measures_its_memory(synthetic_dataset, one_torch_thread):
    found = estimate_fit(synthetic_dataset, tiny_config())
    assert found.steps_per_epoch == 3  # 7 cases, batch 3
    assert found.step_seconds > 0 and found.fits
    assert 100 * 2**20 < found.peak_bytes <= found.available_bytes  # the process itself, with PyTorch loaded
    assert "estimated time per epoch on this CPU" in found.describe()


def test_one_slow_step_does_not_make_the_estimate(monkeypatch):
    """On fresh clones the demo's one timed step took 0.34 to 0.87 s, while training's steps took 0.34 s."""
    times = iter([0.3, 0.35])
    monkeypatch.setattr(estimate, "measured_step", lambda trainer, roi: StepMemory(next(times), 0.0, 0.0, 0.0, 0.0))
    assert estimate.typical_step_seconds(None, (32,) * 3, first=0.9) == 0.35
    slow = iter([9.0])
    monkeypatch.setattr(estimate, "measured_step", lambda trainer, roi: StepMemory(next(slow), 0.0, 0.0, 0.0, 0.0))
    assert estimate.typical_step_seconds(None, (168,) * 3, first=8.0) == 8.0  # a long step is not taken three times


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


def test_the_python_api_estimates_and_refuses_as_the_command_does(synthetic_dataset, tmp_path, monkeypatch, one_torch_thread, capsys):
    monkeypatch.setattr(estimate, "available_memory_bytes", lambda: 1)
    settings = {"preset": "small", "roi": 16, "base_channels": 4, "epochs": 1, "analyze": False, "progress": False}
    with pytest.raises(ConfigError, match="GiB is free"):
        hs.fit(synthetic_dataset, tmp_path / "run", **settings)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    hs.fit(synthetic_dataset, tmp_path / "run", force=True, **settings)
    assert "estimated peak memory" in capsys.readouterr().out  # said, though forced past
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_probe_sizes_are_valid_rois_and_memory_grows_along_their_line():
    assert scaled_roi((168, 168, 168), 0.25, 8, 16) == (40, 40, 40)
    assert scaled_roi((168, 160, 32), 0.5, 8, 16) == (80, 80, 16)
    assert extrapolate(1000, 10.0, 8000, 80.0, 64000) == 640.0
    assert extrapolate(1000, 10.0, 1000, 12.0, 64000) == 12.0  # one probe size: no slope to follow


GIB = 2**30


def test_the_paper_presets_full_step_is_predicted_from_steps_that_peak_in_the_optimizer():
    """Measured on the 2-core machine (paper preset, B = 2, in GiB): the 40³ and 80³ probes' resident peaks are
    Adam's temporaries for the hyper-network's head, not activations; a line through them gave 14 GiB for 168³
    (12.4 measured in place), whose step took 23.2 GiB.  Their backward passes' allocations give it."""
    at_40 = StepMemory(seconds=3.0, peak=4.825 * GIB, allocated_before=2.693 * GIB, backward_peak=3.037 * GIB, allocated_peak=3.937 * GIB)
    at_80 = StepMemory(seconds=12.0, peak=5.708 * GIB, allocated_before=2.697 * GIB, backward_peak=4.921 * GIB, allocated_peak=4.921 * GIB)
    predicted = predicted_peak(40**3, at_40, 80**3, at_80, 168**3)
    assert 1 / 1.3 < predicted / (23.2 * GIB) < 1.3
    assert predicted_peak(40**3, at_40, 80**3, at_80, 48**3) == at_80.peak  # below the larger probe, the optimizer's phase rules


def test_allocated_memory_falls_when_freed():
    before = allocated_bytes()
    block = torch.ones(64 * 2**20 // 4)
    held = allocated_bytes()
    del block
    assert held - before > 60 * 2**20 and allocated_bytes() - before < 8 * 2**20


def test_backward_allocations_of_small_steps_predict_a_larger_ones(one_torch_thread):
    """The line the estimate follows: what the backward pass allocates grows with the voxels."""
    config = tiny_config()
    model = HyperSORT(config.model, [str(index) for index in range(config.batch_size)])
    trainer = Trainer(model, build_optimizers(model, config, torch.device("cpu")), config, torch.device("cpu"))
    measured_step(trainer, (16,) * 3)
    small, large, full = (measured_step(trainer, (side,) * 3) for side in (16, 32, 56))
    predicted = extrapolate(16**3, small.backward_growth, 32**3, large.backward_growth, 56**3)
    assert full.backward_growth > 20 * 2**20
    assert 1 / 1.15 < predicted / full.backward_growth < 1.15
    assert math.isclose(full.allocated_before, large.allocated_before, rel_tol=0.05)  # nothing of the step is left behind


def test_with_several_processes_the_step_is_taken_apart_and_the_cpu_memory_counted_for_each(synthetic_dataset):
    found = estimate_fit(synthetic_dataset, tiny_config(), processes=2)
    assert found.steps_per_epoch == 2 and found.sharing == 2  # 7 cases, batch 3 per process
    assert found.needed_bytes == 2 * found.peak_bytes and "for 2" in found.describe()
    assert torch.get_num_threads() > 1 or os.cpu_count() == 1  # this process's threads untouched


def test_processes_that_together_exceed_the_free_memory_are_refused():
    one = estimate.Estimate("this CPU", 10, peak_bytes=4 * GIB, available_bytes=6 * GIB, step_seconds=1.0)
    assert one.fits and not replace(one, sharing=2).fits
    with pytest.raises(ConfigError, match="8.0 GiB .* 2 processes.*fewer processes"):
        replace(one, sharing=2).check_fits(tiny_config())
