"""`hsort correct`: pseudo-labels of training cases in a cluster's style, and what they change."""

import csv
import shutil

import nibabel as nib
import numpy as np
import pytest
from cli_checks import assert_one_line_error
from click.testing import CliRunner

from hypersort_core.cli.predict import correct
from hypersort_core.run import load_run


def run_correct(*args):
    return CliRunner().invoke(correct, [*map(str, args), "--quiet"])


@pytest.fixture
def analysed_run(trained_run, tmp_path):
    """A copy of the trained run with the clusters.csv and ranking.csv that `hsort analyze` writes."""
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    latents = load_run(run_dir).latents
    with open(run_dir / "clusters.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["cluster", "size", "z0", "z1"], [0, len(latents), *latents.mean(axis=0)]])
    ranking = sorted(load_run(run_dir).case_ids, reverse=True)
    with open(run_dir / "ranking.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["case", "norm", "cluster"], *[[case, 0.0, 0] for case in ranking]])
    return run_dir


def read_changes(path):
    with open(path, newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def test_pseudo_labels_in_the_cases_geometry_and_what_they_changed(analysed_run, synthetic_dataset):
    result = run_correct(analysed_run, "--cluster", "0", "--cases", "synth_001,synth_004")
    assert result.exit_code == 0, result.output

    folder = analysed_run / "corrected_cluster_0"
    changes = read_changes(folder / "changes.csv")
    assert sorted(changes) == ["synth_001", "synth_004"]
    for case, change in changes.items():
        given = nib.load(synthetic_dataset / "labelsTr" / f"{case}.nii.gz")
        pseudo = nib.load(folder / f"{case}.nii.gz")
        assert pseudo.shape == given.shape
        np.testing.assert_array_equal(pseudo.affine, given.affine)
        assert pseudo.get_data_dtype() == np.uint8
        predicted, labelled = np.asarray(pseudo.dataobj) > 0, np.asarray(given.dataobj) > 0
        assert int(change["voxels_added"]) == np.count_nonzero(predicted & ~labelled)
        assert int(change["voxels_removed"]) == np.count_nonzero(labelled & ~predicted)
        expected_dice = 2 * np.count_nonzero(predicted & labelled) / (predicted.sum() + labelled.sum())
        assert float(change["dice_to_given_label"]) == pytest.approx(expected_dice, abs=1e-4)


def test_flagged_takes_the_top_of_the_ranking_into_the_chosen_folder(analysed_run, tmp_path):
    result = run_correct(analysed_run, "--cluster", "0", "--flagged", "2", "--out", tmp_path / "pseudo")
    assert result.exit_code == 0, result.output
    assert sorted(read_changes(tmp_path / "pseudo" / "changes.csv")) == ["synth_005", "synth_006"]
    assert sorted(path.name for path in (tmp_path / "pseudo").glob("*.nii.gz")) == ["synth_005.nii.gz", "synth_006.nii.gz"]


def test_before_analysis_and_with_unknown_cases_the_error_is_one_line(analysed_run):
    (analysed_run / "ranking.csv").unlink()
    result = run_correct(analysed_run, "--cluster", "0", "--flagged", "2")
    assert_one_line_error(result, analysed_run / "ranking.csv")
    assert "run hsort analyze first" in result.stderr
    assert_one_line_error(run_correct(analysed_run, "--cluster", "0", "--cases", "synth_001,nobody"), "nobody")
    assert_one_line_error(run_correct(analysed_run, "--cluster", "3"), "--cluster 3")
