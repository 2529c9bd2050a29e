"""`hsort evaluate`: the paper's Section 4.2 table on a trained run, against perturbations.csv or
reference labels, with the plain-UNet baselines and a test set."""

import csv
import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from hypersort_core.cli.evaluate import evaluate
from hypersort_core.data import make_synthetic_dataset, scored_roi
from hypersort_core.evaluate import perturbation_summary
from hypersort_core.latents import latent_scores, read_latents_csv
from hypersort_core.main_style import main_style_fit, prepared_training_cases, run_misfit
from hypersort_core.run import load_run
from hypersort_core.styles import fit_styles

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_BASELINES = ["--baseline-epochs", "1", "--folds", "2"]
ROWS = ("HyperSORT loss at λ = 0", "HyperSORT latent norm", "HyperSORT mean distance", "plain-UNet training loss", "Test-Dice")


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def hsort_evaluate(run: Path, *options):
    return CliRunner().invoke(evaluate, [str(run), "--quiet", *map(str, options)])


def evaluation_of(run: Path) -> dict:
    return json.loads((run / "evaluation.json").read_text())


def check_metrics(evaluation: dict, score: str) -> None:
    """The file's summary metrics are those of its own per-case values."""
    cases = evaluation["cases"]
    values = [case[score] for case in cases]
    changes = [case["voxels_changed"] for case in cases]
    metrics = evaluation["metrics"][score]
    assert metrics["spearman"] == pytest.approx(spearmanr(values, changes)[0])
    assert metrics["auroc"] == pytest.approx(roc_auc_score([case["changed"] for case in cases], values))


def test_perturbations_give_the_table_of_hypersort_and_both_baselines(run, synthetic_dataset):
    result = hsort_evaluate(run, *TINY_BASELINES)
    assert result.exit_code == 0, result.output
    table = result.output.splitlines()
    assert all(any(line.startswith(row) and "n/a" not in line for line in table) for row in ROWS)

    evaluation = evaluation_of(run)
    with open(synthetic_dataset / "perturbations.csv", newline="") as handle:
        truth = {row["case"]: int(row["voxels_changed"]) for row in csv.DictReader(handle)}
    assert {case["case"]: case["voxels_changed"] for case in evaluation["cases"]} == truth
    _, latents = read_latents_csv(run / "latents.csv")
    norm, _ = latent_scores(latents)
    assert [case["latent_norm"] for case in evaluation["cases"]] == pytest.approx(norm, abs=1e-5)
    assert evaluation["baselines"] == {"epochs": 1, "folds": 2}
    for case in evaluation["cases"]:
        assert case["training_loss"] > 0 and 0 <= case["test_dice"] <= 1
    for score in ("misfit", "loss_lambda0", "loss_own", "latent_norm", "mean_distance", "training_loss", "test_dice"):
        check_metrics(evaluation, score)
    loaded = load_run(run)
    fit = main_style_fit(loaded, prepared_training_cases(loaded))
    for score, values in (("misfit", run_misfit(loaded, fit)), ("loss_lambda0", fit.loss_lambda0), ("loss_own", fit.loss_own)):
        by_case = dict(zip(loaded.case_ids, values))
        assert [case[score] for case in evaluation["cases"]] == pytest.approx([by_case[case["case"]] for case in evaluation["cases"]], rel=1e-5)


def copy_labels(dataset: Path, target: Path, layout: str) -> Path:
    """The training labels as a flat folder of {case}.nii.gz, or as a whole dataset copy; returns the labels folder."""
    if layout == "flat":
        return Path(shutil.copytree(dataset / "labelsTr", target))
    shutil.copytree(dataset, target)
    return target / "labelsTr"


def relabel_background(label_file: Path, voxels: int) -> None:
    """Mark `voxels` background voxels of a label file as foreground, on the same grid."""
    nifti = nib.load(label_file)
    label = np.asarray(nifti.dataobj).copy()
    for index in np.argwhere(label == 0)[:voxels]:
        label[tuple(index)] = 1
    nib.save(nib.Nifti1Image(label, nifti.affine, nifti.header), label_file)


@pytest.mark.parametrize("layout", ["flat", "dataset"])
def test_reference_labels_count_the_voxels_each_label_changed(run, synthetic_dataset, tmp_path, layout):
    reference = tmp_path / "reference"
    labels = copy_labels(synthetic_dataset, reference, layout)
    relabel_background(labels / "synth_002.nii.gz", 10)
    relabel_background(labels / "synth_005.nii.gz", 3)

    result = hsort_evaluate(run, "--reference-labels", reference, "--min-change", 5, "--skip-baselines")
    assert result.exit_code == 0, result.output
    evaluation = evaluation_of(run)
    changed = {case["case"]: case["voxels_changed"] for case in evaluation["cases"] if case["voxels_changed"]}
    assert changed == {"synth_002": 10, "synth_005": 3}
    assert [case["case"] for case in evaluation["cases"] if case["changed"]] == ["synth_002"]
    for score in ("misfit", "loss_lambda0", "loss_own", "latent_norm", "mean_distance"):
        check_metrics(evaluation, score)
    assert "training_loss" not in evaluation["metrics"] and evaluation["baselines"] is None
    assert any(line.startswith("Test-Dice") and "skipped" in line for line in result.output.splitlines())


def manual_dice(prediction: np.ndarray, label: np.ndarray) -> float:
    return 2 * np.sum((prediction == 1) & (label == 1)) / (np.sum(prediction == 1) + np.sum(label == 1))


def test_a_test_set_is_segmented_by_each_cluster_of_clusters_csv(run, tmp_path):
    test = make_synthetic_dataset(tmp_path / "test", cases=3, size=16, seed=1)
    style_latents = np.array([[0.0, 0.0], [0.3, -0.2]])
    with open(run / "clusters.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["cluster", "size", "z0", "z1", "mean_norm"], [0, 5, 0.0, 0.0, 0.01], [1, 2, 0.3, -0.2, 0.4]])

    result = hsort_evaluate(run, "--test", test, "--skip-baselines")
    assert result.exit_code == 0, result.output
    assert "best-of-K Dice" in result.output
    tested = evaluation_of(run)["test"]
    np.testing.assert_allclose([cluster["latent"] for cluster in tested["clusters"]], style_latents)
    assert [case["case"] for case in tested["cases"]] == ["synth_000", "synth_001", "synth_002"]
    dice = np.array([case["dice"] for case in tested["cases"]])
    assert dice.shape == (3, 2) and np.all((dice >= 0) & (dice <= 1))
    assert [case["best_of_k"] for case in tested["cases"]] == pytest.approx(dice.max(axis=1))
    assert tested["mean_case_std"] == pytest.approx(dice.std(axis=1).mean())
    assert [cluster["dice_mean"] for cluster in tested["clusters"]] == pytest.approx(dice.mean(axis=0))

    loaded = load_run(run, "cpu")
    first = loaded.prepared(test).cases[0]
    image, label = scored_roi(first, loaded.config.preprocess)
    assert dice[0, 1] == pytest.approx(manual_dice(loaded.segment_prepared(image, style_latents[1]), label))


def test_without_clusters_csv_the_styles_come_from_a_mixture_chosen_by_bic(run, tmp_path):
    test = make_synthetic_dataset(tmp_path / "test", cases=3, size=16, seed=1)
    result = hsort_evaluate(run, "--test", test, "--skip-baselines")
    assert result.exit_code == 0, result.output
    clusters = evaluation_of(run)["test"]["clusters"]
    assert sum(cluster["size"] for cluster in clusters) == 7
    assert all(len(case["dice"]) == len(clusters) for case in evaluation_of(run)["test"]["cases"])


def test_two_separate_groups_of_latents_make_two_styles():
    rng = np.random.default_rng(0)
    latents = np.concatenate([rng.normal(0, 0.05, (12, 2)), rng.normal((2.0, -1.0), 0.05, (6, 2))])
    styles = sorted(fit_styles(latents), key=lambda style: style.size)
    assert [style.size for style in styles] == [6, 12]
    assert styles[0].latent == pytest.approx([2.0, -1.0], abs=0.1)
    assert styles[1].latent == pytest.approx([0.0, 0.0], abs=0.1)


def without_perturbations(run: Path, dataset: Path, tmp_path: Path) -> list[str]:
    """Point the run at a copy of its dataset that has no perturbations.csv; no options."""
    bare = Path(shutil.copytree(dataset, tmp_path / "bare"))
    (bare / "perturbations.csv").unlink()
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "data": str(bare)}))
    return []


def unrelated_reference(run: Path, dataset: Path, tmp_path: Path) -> list[str]:
    folder = tmp_path / "unrelated"
    folder.mkdir()
    shutil.copy(dataset / "labelsTr" / "synth_000.nii.gz", folder / "other_case.nii.gz")
    return ["--reference-labels", folder]


def misaligned_reference(run: Path, dataset: Path, tmp_path: Path) -> list[str]:
    folder = Path(shutil.copytree(dataset / "labelsTr", tmp_path / "misaligned"))
    nifti = nib.load(folder / "synth_003.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(nifti.dataobj)[:-2], nifti.affine), folder / "synth_003.nii.gz")
    return ["--reference-labels", folder]


@pytest.mark.parametrize(
    "setup, message",
    [
        (without_perturbations, "has no perturbations.csv"),
        (unrelated_reference, "covers none of the run's 7 training cases"),
        (misaligned_reference, "synth_003.nii.gz: label shape (14, 16, 16) differs"),
    ],
)
def test_bad_reference_is_one_line_and_exit_code_2(run, synthetic_dataset, tmp_path, setup, message):
    result = hsort_evaluate(run, *setup(run, synthetic_dataset, tmp_path), "--skip-baselines")
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not (run / "evaluation.json").exists()


def test_perturbation_summary_per_kind_without_erosion_or_dilation_warns_of_nothing(tmp_path):
    """A dataset of other error kinds and a second style: per-kind AUROCs, style cases on neither side,
    and no direction cosine (it compares eroded with dilated) instead of numpy's 'Mean of empty slice'."""
    data = make_synthetic_dataset(tmp_path / "data", cases=12, size=16, perturbed=0.25, seed=0, kinds=("shift", "holes"), style="coarse", style_fraction=0.25)
    with open(data / "perturbations.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    case_ids = [row["case"] for row in rows]
    wrong = np.array([row["kind"] != "clean" for row in rows])
    other_style = np.array([row["style"] != "main" for row in rows])
    score = wrong * 2.0 + other_style * 5.0  # the style cases score highest, yet are no wrong labels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = perturbation_summary(case_ids, np.zeros((12, 2)), {"score": score}, data / "perturbations.csv")
    assert summary.auroc == {"score": 1.0}
    assert summary.auroc_by_kind == {"score": {"holes": 1.0, "shift": 1.0}}
    assert summary.direction_cosine is None
    assert summary.counts == {"clean": 6, "holes": 1, "shift": 2, "style coarse": 3}
