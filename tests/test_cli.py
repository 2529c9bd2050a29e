"""`hsort` as a user runs it: real processes, real signals."""

import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from cli_checks import logged_epochs, wait_for

from hypersort_core.checkpoint import load_checkpoint

TINY_FIT = ["--preset", "small", "--roi", "16", "--base-channels", "4", "--convs-per-level", "1", "--batch-size", "3", "--quiet"]


def hsort(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hypersort_core.cli", *map(str, args)], capture_output=True, text=True, timeout=600, **kwargs)


def start_hsort(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hypersort_core.cli", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "data"
    result = hsort("synth", root, "--cases", 7, "--size", 16, "--perturbed", 0.3)
    assert result.returncode == 0, result.stderr
    return root


@pytest.mark.slow
def test_synth_then_fit_prints_where_results_are_and_the_auroc(dataset, tmp_path):
    result = hsort("fit", dataset, "--out", tmp_path / "run", *TINY_FIT, "--epochs", 2)
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "run" / "latent_map.png") in result.stdout
    assert re.search(
        r"known label errors \(clean \d+, dilated \d+, eroded \d+\): AUROC of misfit \(λ = 0 and own loss\) \d\.\d{3}, latent norm ‖λ‖ \d\.\d{3}", result.stdout
    )
    assert "eroded vs dilated direction cosine" in result.stdout
    assert (dataset / "perturbations.csv").is_file()
    for analysed in ("ranking.csv", "clusters.csv", "report.html", "latent_map.html"):  # fit ends with hsort analyze
        assert str(tmp_path / "run" / analysed) in result.stdout


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_continues_from_the_checkpoint(dataset, tmp_path):
    run = tmp_path / "run"
    process = start_hsort("fit", dataset, "--out", run, *TINY_FIT, "--epochs", 200, "--checkpoint-every", 1)
    wait_for(lambda: len(logged_epochs(run)) >= 3 or process.poll() is not None)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    done = checkpoint["state"]["epoch"]
    assert done >= 2
    before = {row["epoch"]: row["loss"] for row in checkpoint["state"]["log_rows"]}

    result = hsort("fit", dataset, "--out", run, "--resume", "--epochs", done + 2, "--quiet")
    assert result.returncode == 0, result.stderr
    assert logged_epochs(run) == list(range(1, done + 3))
    resumed = load_checkpoint(run / "checkpoint.pt")
    assert {row["epoch"]: row["loss"] for row in resumed["state"]["log_rows"][:done]} == before  # continued, not restarted
    assert resumed["case_ids"] == [f"synth_{i:03d}" for i in range(7)]
    assert torch.isfinite(resumed["model"]["latents.weight"]).all()


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(dataset, tmp_path):
    run = tmp_path / "run"
    process = start_hsort("fit", dataset, "--out", run, *TINY_FIT, "--epochs", 200, "--checkpoint-every", 100)
    wait_for(lambda: len(logged_epochs(run)) >= 1 or process.poll() is not None)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert load_checkpoint(run / "checkpoint.pt")["state"]["epoch"] >= 1


def test_resume_without_a_run_is_a_one_line_error(dataset, tmp_path):
    result = hsort("fit", dataset, "--out", tmp_path / "nothing", "--resume")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "nothing" in result.stderr


@pytest.mark.skipif(os.cpu_count() is None, reason="needs a CPU count")
@pytest.mark.slow
def test_paper_preset_on_cpu_prints_an_epoch_time_estimate(dataset, tmp_path):
    result = hsort("fit", dataset, "--out", tmp_path / "run", "--preset", "paper", "--roi", 16, "--base-channels", 2, "--epochs", 1, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "estimated time per epoch on this CPU" in result.stdout
