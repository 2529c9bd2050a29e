"""`fit` writes the run folder it promises and continues exactly where a checkpoint left off."""

import csv
import json

import numpy as np
import pytest
import torch
from tiny_runs import tiny_config

from hypersort_core.checkpoint import CheckpointError, load_checkpoint
from hypersort_core.config import ConfigError
from hypersort_core.data import make_synthetic_dataset
from hypersort_core.latents import read_latents_csv
from hypersort_core.main_style import main_style_fit, prepared_training_cases
from hypersort_core.misfit import SCORE_EVERY
from hypersort_core.run import load_run
from hypersort_core.train import fit


@pytest.fixture
def dataset(synthetic_dataset):
    return synthetic_dataset


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_fit_writes_the_run_folder(dataset, tmp_path):
    result = fit(dataset, tmp_path / "run", tiny_config(), progress=False)
    run = result.run_dir
    assert result.epochs_done == 2 and result.stopped is None
    config = json.loads((run / "config.json").read_text())
    assert config["cases"] == [f"synth_{i:03d}" for i in range(7)]
    assert config["batch_size"] == 3 and config["model"]["base_channels"] == 4 and "version" in config
    latents = read_csv(run / "latents.csv")
    assert list(latents[0]) == ["case", "z0", "z1", "norm", "mean_dist"]
    assert [row["case"] for row in latents] == config["cases"]
    z = np.array([[float(row["z0"]), float(row["z1"])] for row in latents])
    np.testing.assert_allclose([float(row["norm"]) for row in latents], np.linalg.norm(z, axis=1), rtol=1e-4)
    assert [int(row["epoch"]) for row in read_csv(run / "log.csv")] == [1, 2]
    assert [row["skipped_steps"] for row in read_csv(run / "log.csv")] == ["0", "0"]
    for picture in ("progress.png", "latent_map.png"):
        assert (run / picture).read_bytes().startswith(b"\x89PNG")
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    assert load_checkpoint(run / "checkpoint.pt")["state"]["epoch"] == 2


def test_training_moves_latents_and_lowers_the_loss(dataset, tmp_path):
    result = fit(dataset, tmp_path / "run", tiny_config(epochs=6), progress=False)
    log = read_csv(result.run_dir / "log.csv")
    assert float(log[-1]["loss"]) < float(log[0]["loss"])
    _, latents = read_latents_csv(result.run_dir / "latents.csv")
    torch.manual_seed(0)
    assert not np.allclose(latents, torch.randn(7, 2).numpy() * 0.05, atol=1e-3)


def test_resume_continues_exactly_where_the_checkpoint_left_off(dataset, tmp_path):
    straight = fit(dataset, tmp_path / "straight", tiny_config(epochs=4), progress=False)
    fit(dataset, tmp_path / "resumed", tiny_config(epochs=2), progress=False)
    resumed = fit(dataset, tmp_path / "resumed", tiny_config(epochs=4), resume=True, progress=False)
    assert resumed.epochs_done == 4
    _, a = read_latents_csv(straight.run_dir / "latents.csv")
    _, b = read_latents_csv(resumed.run_dir / "latents.csv")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert [row["loss"] for row in read_csv(straight.run_dir / "log.csv")] == [row["loss"] for row in read_csv(resumed.run_dir / "log.csv")]
    resumed_run = load_run(resumed.run_dir)
    assert resumed_run.training_state["scorings"] == [4 // SCORE_EVERY] * len(resumed_run.case_ids)  # every SCORE_EVERY epochs
    for name, running in load_run(straight.run_dir).running_losses.items():
        np.testing.assert_allclose(resumed_run.running_losses[name], running, rtol=1e-5)


def test_after_each_epoch_every_case_s_label_is_scored_for_the_ranking(dataset, tmp_path):
    """After one epoch the running means are that epoch's losses: the final UNets' judgement of each label."""
    run = load_run(fit(dataset, tmp_path / "run", tiny_config(epochs=1), progress=False).run_dir)
    final = main_style_fit(run, prepared_training_cases(run))
    assert run.training_state["scorings"] == [1] * len(run.case_ids)
    np.testing.assert_allclose(run.running_losses["loss_lambda0"], final.loss_lambda0, rtol=1e-5)
    np.testing.assert_allclose(run.running_losses["loss_own"], final.loss_own, rtol=1e-5)


def test_a_time_budget_stops_mid_epoch_and_resume_finishes_the_same_epoch(dataset, tmp_path):
    stopped = fit(dataset, tmp_path / "run", tiny_config(epochs=3, max_minutes=0.0), progress=False)
    assert stopped.stopped == "time budget"
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["state"]
    assert state["epoch"] == 0 and state["step_in_epoch"] == 1
    straight = fit(dataset, tmp_path / "straight", tiny_config(epochs=3), progress=False)
    resumed = fit(dataset, tmp_path / "run", tiny_config(epochs=3), resume=True, progress=False)
    assert resumed.stopped is None
    np.testing.assert_allclose(
        read_latents_csv(resumed.run_dir / "latents.csv")[1], read_latents_csv(straight.run_dir / "latents.csv")[1], rtol=1e-5, atol=1e-7
    )


def test_fewer_cases_than_the_batch_size_still_trains(tmp_path):
    data = make_synthetic_dataset(tmp_path / "two", cases=2, size=16, perturbed=0.0, seed=1)
    result = fit(data, tmp_path / "run", tiny_config(batch_size=8, epochs=1), progress=False)
    assert result.epochs_done == 1 and len(read_csv(result.run_dir / "latents.csv")) == 2


def test_resume_refuses_a_damaged_checkpoint(dataset, tmp_path):
    fit(dataset, tmp_path / "run", tiny_config(epochs=1), progress=False)
    path = tmp_path / "run" / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="damaged"):
        fit(dataset, tmp_path / "run", tiny_config(epochs=2), resume=True, progress=False)


def test_a_new_fit_does_not_overwrite_an_existing_run_unless_asked(dataset, tmp_path):
    fit(dataset, tmp_path / "run", tiny_config(epochs=1), progress=False)
    with pytest.raises(ConfigError, match="--resume continues it"):
        fit(dataset, tmp_path / "run", tiny_config(epochs=1), progress=False)
    assert fit(dataset, tmp_path / "run", tiny_config(epochs=1), progress=False, overwrite=True).epochs_done == 1


def test_case_ids_that_look_like_math_do_not_break_the_latent_map(tmp_path):
    from hypersort_core.latents import plot_latent_map

    plot_latent_map(tmp_path, ["a $\\frac$ b", "plain"], np.array([[0.5, 0.1], [0.0, 0.0]]), epoch=1)
    assert (tmp_path / "latent_map.png").read_bytes().startswith(b"\x89PNG")


def test_a_run_made_from_a_relative_dataset_path_is_usable_from_any_directory(dataset, tmp_path, monkeypatch):
    from hypersort_core.run import load_run

    monkeypatch.chdir(dataset.parent)
    fit(dataset.name, tmp_path / "run", tiny_config(epochs=1), progress=False)
    monkeypatch.chdir(tmp_path)
    assert [case.case_id for case in load_run(tmp_path / "run", "cpu").prepared().cases] == [f"synth_{i:03d}" for i in range(7)]


def test_commands_after_fit_fall_back_to_the_previous_checkpoint(trained_run, tmp_path):
    import shutil

    from hypersort_core.run import load_run

    run = shutil.copytree(trained_run, tmp_path / "run")
    (run / "checkpoint.pt").rename(run / "checkpoint.prev.pt")  # killed between the two renames of a save
    assert load_run(run, "cpu").case_ids == [f"synth_{i:03d}" for i in range(7)]
