"""Every kind of bad input reaches the user of `hsort fit` as one line naming the file, exit code 2."""

import json

import nibabel as nib
import numpy as np
import pytest
from cli_checks import assert_one_line_error
from click.testing import CliRunner
from dataset_writers import write_nifti, write_nnunet, write_totalsegmentator, write_totalsegmentator_meta

from hypersort_core.cli.main import main
from hypersort_core.run import load_run

FAST = ["--preset", "small", "--roi", "8", "--base-channels", "2", "--convs-per-level", "1", "--epochs", "1", "--quiet"]


def image_of(root, case=1):
    return root / "imagesTr" / f"case_{case:03d}_0000.nii.gz"


def label_of(root, case=1):
    return root / "labelsTr" / f"case_{case:03d}.nii.gz"


def remove_label(root):
    label_of(root).unlink()
    return label_of(root)


def remove_image(root):
    image_of(root).unlink()
    return image_of(root)


def label_of_other_shape(root):
    write_nifti(label_of(root), np.zeros((12, 12, 10), np.uint8))
    return label_of(root)


def label_on_other_grid(root):
    moved = nib.load(image_of(root)).affine.copy()
    moved[:3, 3] += 7.0
    write_nifti(label_of(root), np.asarray(nib.load(label_of(root)).dataobj), moved)
    return label_of(root)


def undeclared_label_value(root):
    label = np.asarray(nib.load(label_of(root)).dataobj).copy()
    label[0, 0, 0] = 7
    write_nifti(label_of(root), label)
    return label_of(root)


def nan_in_image(root):
    image = np.asarray(nib.load(image_of(root)).dataobj).astype(np.float32)
    image[3, 3, 3] = np.nan
    write_nifti(image_of(root), image)
    return image_of(root)


def two_dimensional_image(root):
    write_nifti(image_of(root), np.zeros((12, 12), np.int16))
    return image_of(root)


def four_dimensional_image(root):
    write_nifti(image_of(root), np.zeros((12, 12, 12, 3), np.int16))
    return image_of(root)


def truncated_image(root):
    data = image_of(root).read_bytes()
    image_of(root).write_bytes(data[: len(data) // 2])
    return image_of(root)


CORRUPTIONS = [
    remove_label,
    remove_image,
    label_of_other_shape,
    label_on_other_grid,
    undeclared_label_value,
    nan_in_image,
    two_dimensional_image,
    four_dimensional_image,
    truncated_image,
]


def run_fit(*args):
    return CliRunner().invoke(main, ["fit", *map(str, args)])


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_bad_case_is_one_line_naming_the_file(corrupt, tmp_path):
    root = write_nnunet(tmp_path / "data")
    bad_file = corrupt(root)
    assert_one_line_error(run_fit(root, "--out", tmp_path / "run", *FAST), bad_file)


@pytest.mark.parametrize("corrupt", [remove_label, nan_in_image, truncated_image], ids=lambda f: f.__name__)
def test_skip_bad_trains_on_the_rest_and_lists_what_it_left_out(corrupt, tmp_path):
    root = write_nnunet(tmp_path / "data", n_cases=4)
    bad_file = corrupt(root)
    result = run_fit(root, "--out", tmp_path / "run", *FAST, "--skip-bad")
    assert result.exit_code == 0, result.output
    assert f"skipped bad case: {bad_file}" in result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["cases"] == ["case_000", "case_002", "case_003"]


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_fit(tmp_path / "empty", "--out", tmp_path / "run", *FAST), tmp_path / "empty")


def test_unrecognised_folder(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("hello")
    assert_one_line_error(run_fit(tmp_path / "odd", "--out", tmp_path / "run", *FAST), tmp_path / "odd")


def test_unknown_label(tmp_path):
    root = write_nnunet(tmp_path / "data")
    result = run_fit(root, "--out", tmp_path / "run", *FAST, "--label", "spleen")
    assert_one_line_error(result, root / "dataset.json")
    assert "organ" in result.stderr  # the known names are listed


def test_roi_that_the_unet_cannot_halve_is_refused(tmp_path):
    root = write_nnunet(tmp_path / "data")
    result = run_fit(root, "--out", tmp_path / "run", *FAST[:-1], "--roi", "10")
    assert result.exit_code == 2 and "multiple of 4" in result.stderr


def test_fit_runs_the_dataset_check_first_and_lists_its_warnings_once(tmp_path):
    root = write_nnunet(tmp_path / "data", n_cases=3)
    write_nifti(label_of(root), np.zeros((12, 12, 12), np.uint8))  # an empty label: a warning, not an error
    result = run_fit(root, "--out", tmp_path / "run", *FAST, "--no-analyze")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert str(label_of(root)) in warnings[0]


def test_resume_does_not_check_the_dataset_again(tmp_path, monkeypatch):
    import hypersort_core.check

    root = write_nnunet(tmp_path / "data", n_cases=3)
    assert run_fit(root, "--out", tmp_path / "run", *FAST, "--no-analyze").exit_code == 0
    checked = []
    monkeypatch.setattr(hypersort_core.check, "check_dataset", lambda *args, **kwargs: checked.append(args))
    result = run_fit(root, "--out", tmp_path / "run", "--resume", "--epochs", "2", "--quiet", "--no-analyze")
    assert result.exit_code == 0, result.output
    assert checked == []


def test_fit_split_without_meta_csv_is_one_line(tmp_path):
    data = write_totalsegmentator(tmp_path / "ts", n_cases=3)
    result = CliRunner().invoke(main, ["fit", str(data), "--out", str(tmp_path / "run"), "--split", "train", "--label", "liver", *FAST])
    assert_one_line_error(result, data / "meta.csv")


def test_fit_split_trains_on_that_split_and_the_run_remembers_it(tmp_path):
    data = write_totalsegmentator(tmp_path / "ts", n_cases=4)
    write_totalsegmentator_meta(data, {"s0000": "train", "s0001": "val", "s0002": "train", "s0003": "test"})
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["fit", str(data), "--out", str(run), "--split", "train", "--label", "liver", "--no-analyze", *FAST])
    assert result.exit_code == 0, result.output
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["split"] == "train" and recorded["cases"] == ["s0000", "s0002"]
    assert [case.case_id for case in load_run(run).prepared().cases] == ["s0000", "s0002"]


@pytest.mark.parametrize(
    "options",
    [
        ["--kinds", "eroded,smudged"],
        ["--style-fraction", "0.2"],
        ["--perturbed", "0.9", "--style", "coarse", "--style-fraction", "0.3"],
    ],
)
def test_synth_settings_that_cannot_make_a_dataset_are_one_line(tmp_path, options):
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "out"), "--cases", "4", "--size", "16", *options])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Error:" in result.output
    assert not (tmp_path / "out").exists()
