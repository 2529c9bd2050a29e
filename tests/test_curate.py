"""`hsort curate`: a new nnU-Net dataset with review.csv's decisions applied, the source never touched."""

import csv
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_checks import assert_one_line_error
from click.testing import CliRunner
from dataset_writers import phantom, write_case, write_msd, write_nnunet
from tiny_runs import tiny_config

from hypersort_core.check import check_dataset
from hypersort_core.cli.curate import curate
from hypersort_core.data import read_dataset
from hypersort_core.decisions import COLUMNS
from hypersort_core.predict import latent_probabilities, segment
from hypersort_core.run import load_run
from hypersort_core.train import fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DECISIONS = [  # case, decision, style
    ("synth_000", "use_prediction", "lambda0"),
    ("synth_001", "exclude", ""),
    ("synth_002", "use_prediction", "cluster_1"),
    ("synth_003", "hard_but_correct", ""),
    ("synth_004", "fine", ""),
]


@pytest.fixture
def styled_run(trained_run, tmp_path):
    """A copy of the trained run with a clusters.csv of two styles (what `hsort analyze` writes)."""
    run_dir = shutil.copytree(trained_run, tmp_path / "run")
    latents = load_run(run_dir).latents
    with open(run_dir / "clusters.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["cluster", "size", "z0", "z1"], [0, len(latents) - 1, 0.0, 0.0], [1, 1, *(latents[2] * 3)]])
    return run_dir


def write_review(path, rows, header=COLUMNS):
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *[[case, decision, style, "a note", "tester", "2026-01-01T00:00:00+00:00"] for case, decision, style in rows]])
    return path


def run_curate(*args):
    return CliRunner().invoke(curate, [*map(str, args), "--quiet"])


def tree_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def read_rows(path):
    with open(path, newline="") as handle:
        return {row["case"]: row for row in csv.DictReader(handle)}


def test_the_decisions_make_a_dataset_that_check_passes_and_fit_trains_on(styled_run, synthetic_dataset, tmp_path):
    write_review(styled_run / "review.csv", DECISIONS)
    before = tree_digest(synthetic_dataset)
    out = tmp_path / "Dataset002_Curated"

    result = run_curate(styled_run, "--out", out)

    assert result.exit_code == 0, result.output
    assert tree_digest(synthetic_dataset) == before  # the source is only read
    curated = read_dataset(out)
    assert curated.layout == "nnunet"
    kept = sorted(case.case_id for case in curated.cases)
    assert kept == [case for case in load_run(styled_run).case_ids if case != "synth_001"]
    assert all(case.image.name == f"{case.case_id}_0000.nii.gz" and case.label.name == f"{case.case_id}.nii.gz" for case in curated.cases)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["numTraining"] == len(kept) and meta["labels"] == {"background": 0, "organ": 1} and meta["channel_names"] == {"0": "CT"}
    assert check_dataset(out).errors == []
    rows = read_rows(out / "curation.csv")
    assert {case: (row["decision"], row["label_source"]) for case, row in rows.items()} == {
        "synth_000": ("use_prediction", "prediction"),
        "synth_001": ("exclude", "left out"),
        "synth_002": ("use_prediction", "prediction"),
        "synth_003": ("hard_but_correct", "given"),
        "synth_004": ("fine", "given"),
        "synth_005": ("undecided", "given"),
        "synth_006": ("undecided", "given"),
    }
    assert rows["synth_002"]["style"] == "cluster_1"

    trained = fit(out, tmp_path / "run_on_curated", tiny_config(epochs=1), progress=False)
    assert trained.case_ids == kept


def test_a_replaced_label_is_the_styles_prediction_on_the_labels_grid(styled_run, synthetic_dataset, tmp_path):
    write_review(styled_run / "review.csv", DECISIONS)
    out = tmp_path / "curated"
    assert run_curate(styled_run, "--out", out).exit_code == 0

    run = load_run(styled_run)
    for case, latent in (("synth_000", np.zeros(2, np.float32)), ("synth_002", load_run(styled_run).latents[2] * 3)):
        source_image = nib.load(synthetic_dataset / "imagesTr" / f"{case}_0000.nii.gz")
        given = nib.load(synthetic_dataset / "labelsTr" / f"{case}.nii.gz")
        written = nib.load(out / "labelsTr" / f"{case}.nii.gz")
        assert not np.allclose(source_image.affine, np.eye(4))  # the phantoms' LPS grid, off-centre
        np.testing.assert_allclose(written.affine, given.affine)
        assert written.shape == given.shape
        expected = segment(source_image.get_fdata(dtype=np.float32), source_image.affine, latent_probabilities(run, latent), run.config.preprocess)
        np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
        changed = int(np.count_nonzero(expected != np.asarray(given.dataobj)))
        assert int(read_rows(out / "curation.csv")[case]["voxels_changed"]) == changed
    kept_label = out / "labelsTr" / "synth_003.nii.gz"
    assert not kept_label.is_symlink() and kept_label.read_bytes() == (synthetic_dataset / "labelsTr" / "synth_003.nii.gz").read_bytes()


def test_images_are_linked_or_copied(styled_run, synthetic_dataset, tmp_path):
    write_review(styled_run / "review.csv", DECISIONS[1:2])
    assert run_curate(styled_run, "--out", tmp_path / "linked").exit_code == 0
    assert run_curate(styled_run, "--out", tmp_path / "copied", "--copy").exit_code == 0

    source = synthetic_dataset / "imagesTr" / "synth_000_0000.nii.gz"
    linked, copied = (tmp_path / name / "imagesTr" / "synth_000_0000.nii.gz" for name in ("linked", "copied"))
    assert linked.is_symlink() and linked.resolve() == source.resolve()
    assert not copied.is_symlink() and copied.read_bytes() == source.read_bytes()


def test_an_existing_out_is_replaced_only_with_overwrite_and_only_if_curate_wrote_it(styled_run, synthetic_dataset, tmp_path):
    review = write_review(tmp_path / "decisions.csv", DECISIONS[1:2])
    out = tmp_path / "curated"
    assert run_curate(styled_run, "--out", out, "--review", review).exit_code == 0

    assert_one_line_error(run_curate(styled_run, "--out", out, "--review", review), out)
    write_review(review, [])
    assert run_curate(styled_run, "--out", out, "--review", review, "--overwrite").exit_code == 0
    assert (out / "labelsTr" / "synth_001.nii.gz").is_file()  # the new decisions, not the old ones
    assert not list(tmp_path.glob(".curated*"))  # no building or previous folder left behind

    precious = tmp_path / "precious"
    (precious / "keep.txt").parent.mkdir()
    (precious / "keep.txt").write_text("mine")
    assert_one_line_error(run_curate(styled_run, "--out", precious, "--review", review, "--overwrite"), precious)
    assert (precious / "keep.txt").read_text() == "mine"
    inside = synthetic_dataset / "curated"
    assert_one_line_error(run_curate(styled_run, "--out", inside, "--review", review), inside)
    assert not inside.exists()


@pytest.mark.parametrize(
    "rows, header, problem",
    [
        ([("synth_000", "wrong", "")], COLUMNS, "unknown decision 'wrong'"),
        ([("no_such_case", "fine", "")], COLUMNS, "row 2: 'no_such_case' is not a training case"),
        ([("synth_000", "use_prediction", "")], COLUMNS, "needs a style"),
        ([("synth_000", "use_prediction", "cluster_9")], COLUMNS, "style cluster_9 is not one of the run's styles"),
        ([("synth_000", "fine", "")], ("name", "verdict", "style", "note", "reviewer", "time"), "has no case or decision column"),
    ],
)
def test_a_bad_review_file_is_one_line_naming_it(styled_run, tmp_path, rows, header, problem):
    review = write_review(tmp_path / "review.csv", rows, header)
    result = run_curate(styled_run, "--out", tmp_path / "curated", "--review", review)
    assert_one_line_error(result, review)
    assert problem in result.stderr
    assert not (tmp_path / "curated").exists()


def test_no_review_file_is_one_line_naming_where_it_was_looked_for(styled_run, tmp_path):
    assert_one_line_error(run_curate(styled_run, "--out", tmp_path / "curated"), styled_run / "review.csv")


def trained_on(data, run_dir, **overrides):
    return fit(data, run_dir, tiny_config(**overrides), progress=False).run_dir


def test_a_decathlon_or_plain_folder_dataset_becomes_an_nnunet_one(tmp_path):
    msd = write_msd(tmp_path / "msd")
    run_dir = trained_on(msd, tmp_path / "msd_run")
    review = write_review(tmp_path / "review.csv", [("organ_001", "exclude", ""), ("organ_002", "use_prediction", "lambda0")])
    assert run_curate(run_dir, "--out", tmp_path / "from_msd", "--review", review).exit_code == 0
    meta = json.loads((tmp_path / "from_msd" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "organ": 1} and meta["channel_names"] == {"0": "CT"} and "training" not in meta
    assert sorted(path.name for path in (tmp_path / "from_msd" / "imagesTr").iterdir()) == ["organ_000_0000.nii.gz", "organ_002_0000.nii.gz"]
    assert check_dataset(tmp_path / "from_msd").errors == []

    folders = tmp_path / "folders"
    for index in range(3):
        write_case(folders, *phantom(index, values=(3,)), case_id=f"scan{index}")
    run_dir = trained_on(folders, tmp_path / "folders_run")
    review = write_review(tmp_path / "review.csv", [("scan0", "use_prediction", "lambda0")])
    assert run_curate(run_dir, "--out", tmp_path / "from_folders", "--review", review).exit_code == 0
    meta = json.loads((tmp_path / "from_folders" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "label_3": 3} and meta["channel_names"] == {"0": "image"}
    replaced = np.asarray(nib.load(tmp_path / "from_folders" / "labelsTr" / "scan0.nii.gz").dataobj)
    assert set(np.unique(replaced)) <= {0, 3}  # the prediction in the label's own value
    assert check_dataset(tmp_path / "from_folders").errors == []


def test_a_run_of_some_labels_replaces_only_those(tmp_path):
    data = write_nnunet(tmp_path / "data", labels={"liver": 1, "spleen": 2})
    review = write_review(tmp_path / "review.csv", [("case_000", "use_prediction", "lambda0")])

    run_dir = trained_on(data, tmp_path / "liver_run", label="liver")
    assert run_curate(run_dir, "--out", tmp_path / "curated", "--review", review).exit_code == 0
    given = np.asarray(nib.load(data / "labelsTr" / "case_000.nii.gz").dataobj)
    replaced = np.asarray(nib.load(tmp_path / "curated" / "labelsTr" / "case_000.nii.gz").dataobj)
    run = load_run(run_dir)
    image = nib.load(data / "imagesTr" / "case_000_0000.nii.gz")
    prediction = segment(image.get_fdata(dtype=np.float32), image.affine, latent_probabilities(run, np.zeros(2, np.float32)), run.config.preprocess)
    np.testing.assert_array_equal(replaced[prediction == 1], 1)
    np.testing.assert_array_equal(replaced[(prediction == 0) & (given == 2)], 2)  # the spleen, which the run did not learn, stays
    np.testing.assert_array_equal(replaced[(prediction == 0) & (given != 2)], 0)

    binary = trained_on(data, tmp_path / "binary_run")  # all foreground as one class: which value would a voxel take?
    result = run_curate(binary, "--out", tmp_path / "binary", "--review", review)
    assert_one_line_error(result, data / "labelsTr" / "case_000.nii.gz")
    assert "train with --label" in result.stderr
    assert not (tmp_path / "binary").exists() and not list(tmp_path.glob(".binary*"))


def test_a_kill_leaves_no_dataset_and_the_next_curate_cleans_up(styled_run, tmp_path):
    review = write_review(tmp_path / "review.csv", [(f"synth_00{index}", "use_prediction", "lambda0") for index in range(7)])
    out = tmp_path / "curated"
    hsort = Path(sys.executable).with_name("hsort")
    process = subprocess.Popen([str(hsort), "curate", str(styled_run), "--out", str(out), "--review", str(review), "--quiet", "--device", "cpu"])
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(".curated.curating-*/labelsTr/*.nii.gz")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if process.poll() is not None:
        pytest.skip("curate finished before it could be killed")  # the machine was faster than the poll
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)

    assert not out.exists()  # no half dataset where the user looks
    assert list(tmp_path.glob(".curated.curating-*"))
    assert run_curate(styled_run, "--out", out, "--review", review).exit_code == 0
    assert not list(tmp_path.glob(".curated*"))
    assert len(list((out / "labelsTr").iterdir())) == 7
