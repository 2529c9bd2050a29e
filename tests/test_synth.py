"""The synthetic phantoms: deterministic, CT-like, and with perturbations recorded exactly."""

import csv
import shutil

import nibabel as nib
import numpy as np
import pytest
from dataset_writers import write_manifest

from hypersort_core.data import (
    DataError,
    PreprocessConfig,
    TrainingSet,
    make_synthetic_dataset,
    prepare_cases,
    read_dataset,
    select_labels,
)


def perturbation_rows(out) -> list[dict[str, str]]:
    with open(out / "perturbations.csv", newline="") as file:
        return list(csv.DictReader(file))


def volumes(out, case_id) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(nib.load(out / "imagesTr" / f"{case_id}_0000.nii.gz").dataobj)
    label = np.asarray(nib.load(out / "labelsTr" / f"{case_id}.nii.gz").dataobj)
    return image, label


def test_same_seed_writes_the_same_dataset(tmp_path):
    first = make_synthetic_dataset(tmp_path / "a", cases=4, size=16, perturbed=0.5, seed=3)
    second = make_synthetic_dataset(tmp_path / "b", cases=4, size=16, perturbed=0.5, seed=3)
    other = make_synthetic_dataset(tmp_path / "c", cases=4, size=16, perturbed=0.5, seed=4)
    for index in range(4):
        case_id = f"synth_{index:03d}"
        for a, b in zip(volumes(first, case_id), volumes(second, case_id)):
            np.testing.assert_array_equal(a, b)
        assert not np.array_equal(volumes(first, case_id)[0], volumes(other, case_id)[0])
    assert perturbation_rows(first) == perturbation_rows(second)


def test_default_dataset_has_the_papers_share_of_perturbed_labels(tmp_path):
    out = make_synthetic_dataset(tmp_path / "synth")
    rows = perturbation_rows(out)
    assert [row["case"] for row in rows] == [f"synth_{index:03d}" for index in range(60)]
    perturbed = [row for row in rows if row["kind"] != "clean"]
    assert len(perturbed) == 9
    assert [row["kind"] for row in perturbed] == ["eroded", "dilated"] * 4 + ["eroded"]
    assert all(1 <= int(row["iterations"]) <= 3 and int(row["voxels_changed"]) > 0 for row in perturbed)
    assert all((row["iterations"], row["voxels_changed"]) == ("0", "0") for row in rows if row["kind"] == "clean")
    assert len(read_dataset(out).cases) == 60


def test_voxels_changed_is_the_difference_from_the_clean_label(tmp_path):
    perturbed = make_synthetic_dataset(tmp_path / "perturbed", cases=8, size=16, perturbed=0.5, seed=1)
    clean = make_synthetic_dataset(tmp_path / "clean", cases=8, size=16, perturbed=0.0, seed=1)
    for row in perturbation_rows(perturbed):
        image, label = volumes(perturbed, row["case"])
        clean_image, clean_label = volumes(clean, row["case"])
        np.testing.assert_array_equal(image, clean_image)
        assert np.count_nonzero(label != clean_label) == int(row["voxels_changed"])
        if row["kind"] == "eroded":
            assert np.all(clean_label[label > 0])
        if row["kind"] == "dilated":
            assert np.all(label[clean_label > 0])


def test_eroded_organs_never_vanish(tmp_path):
    out = make_synthetic_dataset(tmp_path / "synth", cases=12, size=16, perturbed=1.0, seed=2)
    for row in perturbation_rows(out):
        assert volumes(out, row["case"])[1].any()


def test_phantoms_look_like_ct(tmp_path):
    out = make_synthetic_dataset(tmp_path / "synth", cases=2, size=32)
    image_file = nib.load(out / "imagesTr" / "synth_000_0000.nii.gz")
    label_file = nib.load(out / "labelsTr" / "synth_000.nii.gz")
    assert image_file.get_data_dtype() == np.int16 and label_file.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.diag(image_file.affine), [-2, -2, 2, 1])
    assert np.all(image_file.affine[:3, 3] != 0)
    np.testing.assert_array_equal(label_file.affine, image_file.affine)
    image, label = volumes(out, "synth_000")
    assert abs(np.median(image[0]) + 1000) < 50  # air at the border of the field of view
    assert 40 < image[label > 0].mean() < 130
    assert 0.01 < label.mean() < 0.3


def test_synthetic_dataset_prepares_into_training_items(tmp_path):
    out = make_synthetic_dataset(tmp_path / "synth", cases=3, size=16)
    dataset = read_dataset(out)
    prepared = prepare_cases(dataset, select_labels(dataset, "organ"), PreprocessConfig(roi=(12, 12, 12)),
                             tmp_path / "cache", progress=False)
    item = TrainingSet(prepared)[0]
    assert item["image"].shape == (1, 12, 12, 12) and set(item["label"].unique().tolist()) == {0, 1}


def test_readers_ignore_perturbations_csv(tmp_path):
    out = make_synthetic_dataset(tmp_path / "synth", cases=2, size=16)
    manifest = write_manifest(tmp_path / "listed", n_cases=2)
    shutil.copy(out / "perturbations.csv", tmp_path / "listed")
    assert read_dataset(tmp_path / "listed").root == manifest
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(out / "perturbations.csv", alone)
    with pytest.raises(DataError, match="not a recognised dataset"):
        read_dataset(alone)


def test_refuses_to_mix_with_an_existing_dataset(tmp_path):
    out = make_synthetic_dataset(tmp_path / "synth", cases=2, size=16)
    with pytest.raises(DataError, match="already exists and is not an empty folder") as error:
        make_synthetic_dataset(out, cases=1, size=16)
    assert error.value.path == out
