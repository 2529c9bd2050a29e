"""`hsort check` flags each kind of broken or suspicious case, with the right severity and exit code."""

import gzip
import json
import os
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_checks import assert_one_line_error
from click.testing import CliRunner
from dataset_writers import (
    AFFINE,
    phantom,
    write_folders,
    write_json,
    write_manifest,
    write_msd,
    write_nifti,
    write_nnunet,
    write_totalsegmentator,
)

from hypersort_core.check import check_dataset
from hypersort_core.cli.check import check
from hypersort_core.data import DataError, PreprocessConfig, prepare_cases, read_dataset, select_labels
from hypersort_core.data.volumes import distinct_values


def image_of(root, case=1):
    return root / "imagesTr" / f"case_{case:03d}_0000.nii.gz"


def label_of(root, case=1):
    return root / "labelsTr" / f"case_{case:03d}.nii.gz"


def voxels(path):
    return np.asarray(nib.load(path).dataobj).copy()


def edit_dataset_json(root, **changes):
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(changes)
    write_json(root / "dataset.json", {key: value for key, value in meta.items() if value is not None})


def run_check(*args):
    return CliRunner().invoke(check, [*map(str, args), "--quiet"])


# Errors: the case (or the dataset) cannot be trained on as it is.


def remove_label(root):
    label_of(root).unlink()
    return label_of(root), "missing"


def remove_image(root):
    image_of(root).unlink()
    return image_of(root), "missing"


def label_of_other_shape(root):
    write_nifti(label_of(root), np.zeros((12, 12, 10), np.uint8))
    return label_of(root), "label shape (12, 12, 10) differs"


def label_on_other_grid(root):
    moved = AFFINE.copy()
    moved[:3, 3] += 7.0
    write_nifti(label_of(root), voxels(label_of(root)), moved)
    return label_of(root), "label affine differs"


def label_with_other_spacing(root):
    stretched = AFFINE.copy()
    stretched[2, 2] = 3.0
    write_nifti(label_of(root), voxels(label_of(root)), stretched)
    return label_of(root), "label affine differs"


def undeclared_label_value(root):
    label = voxels(label_of(root))
    label[0, 0, 0] = 7
    write_nifti(label_of(root), label)
    return label_of(root), "label values 7 are not declared"


def nan_in_image(root):
    image = voxels(image_of(root)).astype(np.float32)
    image[3, 3, 3], image[4, 4, 4] = np.nan, np.inf
    write_nifti(image_of(root), image)
    return image_of(root), "2 NaN or infinite voxels"


def image_affine_with_nan(root):
    """nibabel refuses to write such a header, so the first sform entry (bytes 280-283) is patched."""
    header_and_data = bytearray(gzip.decompress(image_of(root).read_bytes()))
    header_and_data[280:284] = struct.pack("<f", np.nan)
    image_of(root).write_bytes(gzip.compress(bytes(header_and_data)))
    return image_of(root), "affine (qform/sform) holds NaN or infinite values"


def missing_dataset_json_key(root):
    edit_dataset_json(root, file_ending=None)
    return root / "dataset.json", "required key 'file_ending' is missing"


def wrong_num_training(root):
    edit_dataset_json(root, numTraining=5)
    return root / "dataset.json", "numTraining is 5 but 3 training cases were found"


ERRORS = [
    remove_label,
    remove_image,
    label_of_other_shape,
    label_on_other_grid,
    label_with_other_spacing,
    undeclared_label_value,
    nan_in_image,
    image_affine_with_nan,
    missing_dataset_json_key,
    wrong_num_training,
]


# Warnings: the case can be trained on, but a curator should look at it.


def empty_label(root):
    write_nifti(label_of(root), np.zeros_like(voxels(label_of(root))))
    return label_of(root), "label is empty"


def flipped_orientation(root):
    flipped = AFFINE.copy()
    flipped[0, 0] = 1.5
    write_nifti(image_of(root), voxels(image_of(root)), flipped)
    write_nifti(label_of(root), voxels(label_of(root)), flipped)
    return image_of(root), "orientation RPS differs from LPS of 2 of 3 cases"


def duplicated_image(root):
    shutil.copy(image_of(root, case=0), image_of(root))
    return image_of(root), "identical to those of case_000"


def spacing_outlier(root):
    coarse = AFFINE.copy()
    coarse[2, 2] = 7.5
    write_nifti(image_of(root), voxels(image_of(root)), coarse)
    write_nifti(label_of(root), voxels(label_of(root)), coarse)
    return image_of(root), "spacing 1.5×1.5×7.5 mm is an outlier (median 1.5×1.5×2.5 mm)"


def size_outlier(root):
    image, label = phantom(1, shape=(12, 12, 30))
    write_nifti(image_of(root), image)
    write_nifti(label_of(root), label)
    return image_of(root), "size 12×12×30 voxels is an outlier"


def label_in_the_air(root):
    image, label = ct_body()
    label[1:3, 1:3, 1:3] = 1  # a corner of the volume, in the air around the body
    write_nifti(image_of(root), image)
    write_nifti(label_of(root), label)
    return label_of(root), "8 of 8 foreground voxels (100%) lie outside the body"


def ct_body():
    """A CT-like volume: soft tissue (40 HU) in the middle of air (−1000 HU), and an empty label."""
    image = np.full((12, 12, 12), -1000, np.int16)
    image[3:9, 3:9, :] = 40
    return image, np.zeros(image.shape, np.uint8)


WARNINGS = [empty_label, flipped_orientation, duplicated_image, spacing_outlier, size_outlier, label_in_the_air]


@pytest.fixture
def dataset(tmp_path):
    """Three clean nnU-Net cases (case_000 to case_002) on one grid."""
    return write_nnunet(tmp_path / "data", n_cases=3)


def test_a_clean_dataset_passes(dataset):
    result = run_check(dataset)
    assert result.exit_code == 0, result.output
    assert [line.split()[:2] for line in result.stdout.splitlines()[1:4]] == [[f"case_00{i}", "ok"] for i in range(3)]
    assert "3 cases: 3 ok, 0 with warnings, 0 with errors" in result.stdout


@pytest.mark.parametrize("write", [write_msd, write_totalsegmentator, write_folders, write_manifest])
def test_clean_datasets_of_every_layout_pass(tmp_path, write):
    report = check_dataset(write(tmp_path / "data"))
    assert (report.errors, report.warnings, [case.status for case in report.cases]) == ([], [], ["ok"] * 3)


def test_on_hsort_synth_data_only_a_label_dilated_into_the_air_is_flagged(synthetic_dataset):
    report = check_dataset(synthetic_dataset)
    kinds = dict(line.split(",")[:2] for line in (synthetic_dataset / "perturbations.csv").read_text().splitlines())
    assert report.errors == []
    assert [(issue.case, kinds[issue.case], "outside the body" in issue.problem) for issue in report.warnings] == [("synth_006", "dilated", True)]


@pytest.mark.parametrize("corrupt", ERRORS)
def test_each_error_is_reported_naming_the_file_and_exits_2(dataset, corrupt):
    file, problem = corrupt(dataset)
    result = run_check(dataset)
    assert result.exit_code == 2, result.output
    report = json.loads(run_check(dataset, "--json").stdout)
    assert [(error["file"], problem in error["problem"]) for error in report["errors"]] == [(str(file), True)]
    assert f"{file}: " in result.stdout and problem in result.stdout


@pytest.mark.parametrize("spoil", WARNINGS)
def test_each_warning_is_reported_for_its_case_only_and_exits_1(dataset, spoil):
    file, problem = spoil(dataset)
    result = run_check(dataset)
    assert result.exit_code == 1, result.output
    report = json.loads(run_check(dataset, "--json").stdout)
    assert report["errors"] == []
    assert {case["case"]: case["status"] for case in report["cases"]} == {
        "case_000": "warning" if spoil is duplicated_image else "ok",
        "case_001": "warning",
        "case_002": "ok",
    }
    case_001 = [warning for warning in report["warnings"] if warning["case"] == "case_001"]
    assert [(warning["file"], problem in warning["problem"]) for warning in case_001] == [(str(file), True)]


def test_a_spacing_far_from_a_tight_spread_is_an_outlier_though_within_a_factor_2(tmp_path):
    root = write_nnunet(tmp_path / "data", n_cases=7)
    for case, slice_spacing in enumerate([2.5, 2.4, 2.6, 2.5, 2.5, 2.45, 4.0]):
        spaced = AFFINE.copy()
        spaced[2, 2] = slice_spacing
        for file in (image_of(root, case), label_of(root, case)):
            write_nifti(file, voxels(file), spaced)
    outliers = [issue.case for issue in check_dataset(root).warnings if "spacing" in issue.problem]
    assert outliers == ["case_006"]


def test_labels_in_enclosed_air_such_as_an_airway_are_inside_the_body(dataset):
    image, label = ct_body()
    image[5:7, 5:7, :] = -1000  # a tube of air through the whole volume, like the trachea
    label[5:7, 5:7, :] = 1
    write_nifti(image_of(dataset), image)
    write_nifti(label_of(dataset), label)
    assert check_dataset(dataset).warnings == []


def test_json_output_is_the_report(dataset):
    empty_label(dataset)
    result = run_check(dataset, "--json")
    document = json.loads(result.stdout)
    assert document == check_dataset(dataset).to_dict()
    assert document["summary"] == {"cases": 3, "ok": 2, "warning": 1, "error": 0, "errors": 0, "warnings": 1, "exit_code": 1}


def test_a_selected_structure_missing_from_a_case_names_its_mask(tmp_path):
    root = write_totalsegmentator(tmp_path / "ts", n_cases=3)
    mask = root / "s0001" / "segmentations" / "spleen.nii.gz"
    write_nifti(mask, np.zeros_like(voxels(mask)))
    report = check_dataset(root, label="spleen")
    assert [(issue.case, issue.file, issue.problem) for issue in report.warnings] == [("s0001", mask, "label 'spleen' is empty in this case")]
    assert check_dataset(root, label="liver").exit_code == 0


def test_a_folder_that_is_no_dataset_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "notes.txt").write_text("not a dataset")
    assert_one_line_error(run_check(tmp_path), tmp_path)


def test_fit_can_stop_at_the_first_error_and_say_how_many_more(dataset):
    remove_label(dataset)
    nan_in_image(dataset)
    with pytest.raises(DataError) as raised:
        check_dataset(dataset).raise_on_errors()
    assert raised.value.path == label_of(dataset)
    assert "(and 1 more errors; `hsort check` lists them)" in str(raised.value)
    check_dataset(write_nnunet(dataset.parent / "clean")).raise_on_errors()


# One read per case: the findings are cached with the prepared cases, keyed by the files.


def loads_counted(monkeypatch) -> list:
    """Every NIfTI file nibabel opens from now on, in order."""
    opened, load = [], nib.load
    monkeypatch.setattr(nib, "load", lambda path, *args, **kwargs: opened.append(Path(path).name) or load(path, *args, **kwargs))
    return opened


def test_a_second_check_of_unchanged_files_reads_no_volume(dataset, monkeypatch):
    duplicated_image(dataset)
    undeclared_label_value(dataset)
    first = run_check(dataset, "--json")

    def fail(*_, **__):
        raise AssertionError("a case with unchanged files was read again")

    with monkeypatch.context() as patched:
        patched.setattr(nib, "load", fail)
        second = run_check(dataset, "--json")
    assert (second.exit_code, second.stdout) == (first.exit_code, first.stdout) and first.exit_code == 2

    changed = label_of(dataset, case=2)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    opened = loads_counted(monkeypatch)
    assert run_check(dataset, "--json").stdout == first.stdout
    assert sorted(opened) == ["case_002.nii.gz", "case_002_0000.nii.gz"]


def test_fit_checks_and_prepares_each_case_in_one_read(dataset, monkeypatch, cache_dir):
    """What `hsort fit` does before training: each file opened once, then the preparation reads nothing."""
    label_in_the_air(dataset)
    config = PreprocessConfig(roi=(8, 8, 8))
    opened = loads_counted(monkeypatch)
    report = check_dataset(dataset, cache_dir=cache_dir, prepare=config)
    assert sorted(opened) == sorted(path.name for case in range(3) for path in (image_of(dataset, case), label_of(dataset, case)))
    assert report.to_dict() == check_dataset(dataset).to_dict()  # the same findings as a check without a cache
    opened.clear()
    dataset_read = read_dataset(dataset)
    prepared = prepare_cases(dataset_read, select_labels(dataset_read, None), config, cache_dir, progress=False)
    assert opened == [] and len(prepared.cases) == 3
    assert check_dataset(dataset, cache_dir=cache_dir, prepare=config).to_dict() == report.to_dict() and opened == []


def test_a_case_whose_preparation_is_missing_is_read_again(dataset, monkeypatch, cache_dir):
    """A check alone caches findings but prepares nothing: fit's first run then reads each case once more."""
    check_dataset(dataset, cache_dir=cache_dir)
    opened = loads_counted(monkeypatch)
    check_dataset(dataset, cache_dir=cache_dir, prepare=PreprocessConfig(roi=(8, 8, 8)))
    assert len(opened) == 6


@pytest.mark.parametrize("spoil", [undeclared_label_value, nan_in_image, duplicated_image, label_in_the_air, empty_label])
def test_worker_processes_find_what_one_process_finds(dataset, spoil, tmp_path):
    spoil(dataset)
    alone = check_dataset(dataset).to_dict()
    assert check_dataset(dataset, cache_dir=tmp_path / "cache", workers=2).to_dict() == alone
    assert run_check(dataset, "--json", "--workers", "2").stdout.strip() == json.dumps(alone, indent=2)


def test_a_label_in_the_air_of_a_large_volume_is_found_on_the_subsampled_body(tmp_path):
    """Volumes wider than BODY_MASK_SIDE voxels find the body on a subsample; the voxels are still counted in full."""
    image = np.full((300, 24, 20), -1000, np.int16)
    image[40:260, 4:20, :] = 40
    image[100:110, 10:14, :] = -900  # an airway, enclosed by the body in every axial slice
    label = np.zeros(image.shape, np.uint8)
    label[100:110, 10:14, 5:15] = 1  # inside the airway: inside the body
    root = write_nnunet(tmp_path / "data", n_cases=3, shape=image.shape)
    for case in range(3):
        image[0, 0, 0] = -1000 - case  # three images, not one three times
        write_nifti(image_of(root, case), image)
        write_nifti(label_of(root, case), label)
    assert check_dataset(root).warnings == []
    label[2:12, 1:3, 1:3] = 1  # 40 voxels in the air beside the body
    write_nifti(label_of(root), label)
    (warning,) = check_dataset(root).warnings
    assert warning.case == "case_001" and warning.problem.startswith("40 of 440 foreground voxels (9%) lie outside the body")


@pytest.mark.parametrize(
    "values",
    [
        np.array([0, 1, 1, 3, 2, 0], np.uint8),
        np.array([-2, 0, 5, 5], np.int16),
        np.array([0, 300, 17, 40000], np.int32),  # a range wider than FEW_VALUES: a histogram
        np.array([0.0, 1.0, 2.0, 1.0], np.float32),
        np.array([0.0, 0.5, np.nan, 1.0], np.float64),
        np.array([0, 2**40], np.int64),  # a range no histogram holds
        np.array([True, False, True]),
    ],
)
def test_label_values_are_those_np_unique_finds(values):
    volume = np.asfortranarray(np.resize(values, (5, 4, 3)))
    found = distinct_values(volume)
    assert found.dtype == volume.dtype
    np.testing.assert_array_equal(found, np.unique(volume))
