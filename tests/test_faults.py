"""Training survives the faults of long runs: kills, full disks, NaN losses and files that vanish."""

import errno
import io
import math
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny_runs import tiny_config

import hypersort_core.atomic
import hypersort_core.checkpoint
import hypersort_core.train
from hypersort_core.checkpoint import CheckpointError, load_checkpoint
from hypersort_core.cli.main import main as hsort_main
from hypersort_core.model import HyperSORT
from hypersort_core.run_folder import read_config
from hypersort_core.train import (
    MAX_NONFINITE_IN_A_ROW,
    TrainingDiverged,
    fit,
)

REAL_SAVE = torch.save


@pytest.fixture
def dataset(synthetic_dataset, one_torch_thread):
    return synthetic_dataset


def saved_epoch(path: Path) -> int:
    return load_checkpoint(path)["state"]["epoch"]


def leftover_temporaries(run: Path) -> list[Path]:
    return list(run.glob(".*.tmp"))


def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_resumed(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    fit(dataset, run, tiny_config(epochs=2), progress=False)
    assert saved_epoch(run / "checkpoint.prev.pt") == 1
    newest = run / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    result = fit(dataset, run, tiny_config(epochs=3), resume=True, progress=False)
    message = capsys.readouterr().err
    assert f"{newest}: damaged" in message and f"using {run / 'checkpoint.prev.pt'}" in message
    assert result.epochs_done == 3
    assert [row["epoch"] for row in load_checkpoint(newest)["state"]["log_rows"]] == [1, 2, 3]
    assert saved_epoch(run / "checkpoint.prev.pt") == 2  # the damaged file was set aside, not rotated in
    assert (run / "checkpoint.damaged.pt").is_file()


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_to_resume_from(dataset, tmp_path):
    run = tmp_path / "run"
    fit(dataset, run, tiny_config(epochs=1), progress=False)
    killed_mid_write = f"""
import io, os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import torch
import hypersort_core.checkpoint
from tiny_runs import tiny_config
from hypersort_core.train import fit
real_save = torch.save

def save_half_then_die(payload, handle):
    buffer = io.BytesIO()
    real_save(payload, buffer)
    handle.write(buffer.getvalue()[: buffer.tell() // 2])
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)

hypersort_core.checkpoint.torch.save = save_half_then_die
fit({str(dataset)!r}, {str(run)!r}, tiny_config(epochs=2), resume=True, progress=False)
"""
    process = subprocess.run([sys.executable, "-c", killed_mid_write], check=False, capture_output=True, text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr
    assert leftover_temporaries(run), "the kill should have cut a checkpoint write short"
    assert saved_epoch(run / "checkpoint.pt") == 1

    result = fit(dataset, run, tiny_config(epochs=2), resume=True, progress=False)
    assert result.epochs_done == 2 and saved_epoch(run / "checkpoint.pt") == 2
    assert not leftover_temporaries(run)


def test_a_kill_between_the_two_renames_of_a_checkpoint_rotation_still_resumes(dataset, tmp_path, monkeypatch, capsys):
    class Killed(BaseException):
        pass

    real_replace = hypersort_core.atomic.os.replace

    def die_before_the_new_checkpoint_takes_its_name(source, target):
        if Path(source).name.startswith(".checkpoint.pt."):
            raise Killed
        real_replace(source, target)

    run = tmp_path / "run"
    fit(dataset, run, tiny_config(epochs=1), progress=False)
    monkeypatch.setattr(hypersort_core.atomic.os, "replace", die_before_the_new_checkpoint_takes_its_name)
    with pytest.raises(Killed):
        fit(dataset, run, tiny_config(epochs=2), resume=True, progress=False)
    monkeypatch.undo()
    assert not (run / "checkpoint.pt").exists() and saved_epoch(run / "checkpoint.prev.pt") == 1

    assert fit(dataset, run, tiny_config(epochs=2), resume=True, progress=False).epochs_done == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def write_half_then_fill_the_disk(payload, handle):
    buffer = io.BytesIO()
    REAL_SAVE(payload, buffer)
    handle.write(buffer.getvalue()[: buffer.tell() // 2])
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_a_clear_error_and_the_previous_checkpoint_stays_intact(dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    fit(dataset, run, tiny_config(epochs=1), progress=False)
    before = (run / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(hypersort_core.checkpoint.torch, "save", write_half_then_fill_the_disk)
    with pytest.raises(CheckpointError, match="no space left on the device") as error:
        fit(dataset, run, tiny_config(epochs=2), resume=True, progress=False)
    assert str(run / "checkpoint.pt") in str(error.value)
    assert (run / "checkpoint.pt").read_bytes() == before and not leftover_temporaries(run)


def test_a_full_disk_while_writing_the_run_folder_names_the_file_and_keeps_the_checkpoint(dataset, tmp_path, monkeypatch):
    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    run = tmp_path / "run"
    fit(dataset, run, tiny_config(epochs=1), progress=False)
    before = (run / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(hypersort_core.atomic.os, "fsync", full_disk)
    with pytest.raises(CheckpointError, match=f"{run / 'config.json'}: no space left on the device"):
        fit(dataset, run, tiny_config(epochs=2), resume=True, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == before and not leftover_temporaries(run)


def test_a_full_disk_ends_hsort_fit_with_one_line_and_exit_code_2(dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    fit(dataset, run, tiny_config(epochs=1), progress=False)
    monkeypatch.setattr(hypersort_core.checkpoint.torch, "save", write_half_then_fill_the_disk)
    result = CliRunner().invoke(hsort_main, ["fit", str(dataset), "--out", str(run), "--resume", "--epochs", "2", "--quiet", "--no-analyze"])
    assert result.exit_code == 2, result.output
    error = result.stderr.strip().splitlines()[-1]  # earlier lines: the dataset check's warnings
    assert error == f"hsort: error: {run / 'checkpoint.pt'}: no space left on the device; the previous checkpoint is intact"


def loss_made_nonfinite(monkeypatch, bad_calls) -> None:
    """Make the loss of the listed calls (1-based, or every call for None) NaN."""
    real_loss, calls = hypersort_core.train.hypersort_loss, []

    def loss(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        calls.append(1)
        return replace(terms, total=terms.total * math.nan) if bad_calls is None or len(calls) in bad_calls else terms

    monkeypatch.setattr(hypersort_core.train, "hypersort_loss", loss)


def test_a_nan_loss_skips_its_step_with_a_warning_and_is_counted(dataset, tmp_path, monkeypatch, capsys):
    loss_made_nonfinite(monkeypatch, bad_calls={2})
    result = fit(dataset, tmp_path / "run", tiny_config(epochs=2), progress=False)
    assert result.epochs_done == 2
    assert capsys.readouterr().err.count("step skipped") == 1
    checkpoint = load_checkpoint(result.run_dir / "checkpoint.pt")
    assert [row["skipped_steps"] for row in checkpoint["state"]["log_rows"]] == [1, 0]
    assert all(math.isfinite(row["loss"]) for row in checkpoint["state"]["log_rows"])
    assert all(torch.isfinite(weight).all() for weight in checkpoint["model"].values())


def test_a_loss_that_stays_nan_stops_training_with_a_checkpoint_of_the_last_good_state(dataset, tmp_path, monkeypatch, capsys):
    loss_made_nonfinite(monkeypatch, bad_calls=None)
    with pytest.raises(TrainingDiverged, match=f"NaN or Inf for {MAX_NONFINITE_IN_A_ROW} steps in a row.*--lr"):
        fit(dataset, tmp_path / "run", tiny_config(epochs=4), progress=False)
    assert capsys.readouterr().err.count("step skipped") == MAX_NONFINITE_IN_A_ROW
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    config, _ = read_config(tmp_path / "run")
    torch.manual_seed(config.seed)
    initial = HyperSORT(config.model, checkpoint["case_ids"]).state_dict()
    torch.testing.assert_close(checkpoint["model"], initial, rtol=0, atol=0)  # no step was taken
    assert checkpoint["state"]["log_rows"][0]["skipped_steps"] == 3 and checkpoint["state"]["skipped_in_epoch"] == 2


def delete(path: Path) -> None:
    path.unlink()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def test_a_loss_that_stays_nan_ends_hsort_fit_with_one_line_and_exit_code_2(dataset, tmp_path, monkeypatch):
    loss_made_nonfinite(monkeypatch, bad_calls=None)
    tiny = ["--preset", "small", "--roi", "16", "--base-channels", "4", "--convs-per-level", "1", "--batch-size", "3"]
    result = CliRunner().invoke(hsort_main, ["fit", str(dataset), "--out", str(tmp_path / "run"), *tiny, "--epochs", "3", "--quiet", "--no-analyze"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("hsort: error: training stopped: the loss was NaN or Inf")


def garble(path: Path) -> None:
    path.write_bytes(b"\x93NUMPY" + b"garbage" * 20)


@pytest.mark.parametrize("damage", [delete, truncate, garble])
def test_a_case_whose_cache_becomes_unreadable_mid_run_is_prepared_again_once(dataset, tmp_path, monkeypatch, capsys, damage, cache_dir):
    real_write, latents_after_epoch_1 = hypersort_core.train.write_epoch_outputs, []

    def damage_a_case_after_epoch_1(run_dir, model, state):
        real_write(run_dir, model, state)
        if state.epoch == 1:
            damage(next(cache_dir.rglob("*synth_003*.label.npy")))
            latents_after_epoch_1.append(model.latents.weight.detach().clone())

    monkeypatch.setattr(hypersort_core.train, "write_epoch_outputs", damage_a_case_after_epoch_1)
    result = fit(dataset, tmp_path / "run", tiny_config(epochs=3), progress=False)
    assert result.epochs_done == 3
    warnings = [line for line in capsys.readouterr().err.splitlines() if "synth_003" in line]
    assert len(warnings) == 1 and ".label.npy is unreadable" in warnings[0] and "prepared it again from its source files" in warnings[0]
    assert "allow_pickle" not in warnings[0]
    assert not result.bad_cases
    final = load_checkpoint(result.run_dir / "checkpoint.pt")["model"]["latents.weight"]
    assert not np.allclose(final[3].numpy(), latents_after_epoch_1[0][3].numpy())  # trained on after its repair


def test_a_case_whose_cache_and_source_both_become_unreadable_is_reported_once_and_left_out(tmp_path, monkeypatch, capsys, cache_dir, one_torch_thread):
    from hypersort_core.data import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", cases=5, size=16, perturbed=0.0, seed=0)
    real_write, latents_after_epoch_1 = hypersort_core.train.write_epoch_outputs, []

    def damage_a_case_after_epoch_1(run_dir, model, state):
        real_write(run_dir, model, state)
        if state.epoch == 1:
            truncate(next(cache_dir.rglob("*synth_003*.label.npy")))
            (data / "labelsTr" / "synth_003.nii.gz").unlink()
            latents_after_epoch_1.append(model.latents.weight.detach().clone())

    monkeypatch.setattr(hypersort_core.train, "write_epoch_outputs", damage_a_case_after_epoch_1)
    result = fit(data, tmp_path / "run", tiny_config(epochs=3), progress=False)
    assert result.epochs_done == 3
    warnings = [line for line in capsys.readouterr().err.splitlines() if "synth_003" in line]
    assert len(warnings) == 1 and "preparing it again failed" in warnings[0] and "left out" in warnings[0]
    assert any("synth_003" in str(error) for error in result.bad_cases)
    final = load_checkpoint(result.run_dir / "checkpoint.pt")["model"]["latents.weight"]
    np.testing.assert_array_equal(final[3].numpy(), latents_after_epoch_1[0][3].numpy())  # trained no more
