"""The synthetic phantoms: deterministic, CT-like, and with perturbations recorded exactly."""

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from dataset_writers import write_manifest
from scipy import ndimage

from hypersort_core.data import (
    DataError,
    PreprocessConfig,
    TrainingSet,
    label_errors,
    make_synthetic_dataset,
    prepare_cases,
    read_dataset,
    select_labels,
)
from hypersort_core.data.label_errors import ERROR_KINDS
from hypersort_core.data.synth import phantom


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
    assert all(1 <= json.loads(row["parameters"])["iterations"] <= 3 and int(row["voxels_changed"]) > 0 for row in perturbed)
    assert all((row["severity"], row["parameters"], row["voxels_changed"]) == ("0", "{}", "0") for row in rows if row["kind"] == "clean")
    assert {row["style"] for row in rows} == {"main"}
    assert len(read_dataset(out).cases) == 60


def test_every_error_kind_and_a_style_subset(tmp_path):
    out = make_synthetic_dataset(tmp_path / "synth", cases=20, size=24, perturbed=0.35, seed=5, kinds=tuple(ERROR_KINDS), style="neighbour", style_fraction=0.2)
    clean = make_synthetic_dataset(tmp_path / "clean", cases=20, size=24, perturbed=0.0, seed=5)
    rows = perturbation_rows(out)
    assert sorted(row["kind"] for row in rows if row["kind"] != "clean") == sorted(ERROR_KINDS)
    style_rows = [row for row in rows if row["style"] == "neighbour"]
    assert len(style_rows) == 4 and all(row["kind"] == "clean" for row in style_rows)
    for row in rows:
        image, label = volumes(out, row["case"])
        clean_image, organ = volumes(clean, row["case"])
        np.testing.assert_array_equal(image, clean_image)  # only the label is wrong
        assert np.count_nonzero(label != organ) == int(row["voxels_changed"])
        assert (row["kind"] == "clean" and row["style"] == "main") == (row["voxels_changed"] == "0")
        json.loads(row["parameters"])


@pytest.fixture(scope="module")
def anatomy():
    return phantom(24, np.random.default_rng(3))[1]


@pytest.mark.parametrize("severity", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_error_kind_changes_the_label_as_its_name_says(anatomy, severity, seed):
    organ, neighbour = anatomy.organ, anatomy.neighbours[0]
    made = {kind: error(anatomy, severity, np.random.default_rng(seed))[0] for kind, error in ERROR_KINDS.items()}
    assert all(label.any() and not np.array_equal(label, organ) for label in made.values())
    for kind in ("eroded", "incomplete", "holes"):
        assert not np.any(made[kind] & ~organ), kind  # labels missing, none added
    for kind in ("dilated", "extra"):
        assert np.all(made[kind][organ]), kind  # labels added, none missing
    added = made["extra"] & ~organ
    assert not np.any(added & neighbour) and np.all(anatomy.body[added])  # tissue, not the adjacent structure
    holes = organ & ~made["holes"]
    assert not np.any(holes & ~ndimage.binary_erosion(organ))  # inside the organ, the contour kept
    shifted = made["shift"]
    assert abs(int(shifted.sum()) - int(organ.sum())) <= 0.3 * organ.sum()
    wrong = made["wrong_neighbour"]
    if severity < 3:
        np.testing.assert_array_equal(wrong, organ | neighbour)
    else:
        np.testing.assert_array_equal(wrong, neighbour)


def test_incomplete_leaves_out_the_cranial_end_or_a_run_of_slices(anatomy):
    for seed in range(6):
        label, parameters = label_errors.incomplete(anatomy, 2, np.random.default_rng(seed))
        missing = anatomy.organ & ~label
        axis = 2 if parameters["part"] == "cranial end" else parameters["axis"]
        planes = np.flatnonzero(missing.any(axis=tuple(a for a in range(3) if a != axis)))
        assert len(planes) == parameters["slices"] and np.all(np.diff(planes) == 1)  # one run of whole slices
        if parameters["part"] == "cranial end":
            assert planes[-1] == label_errors.extent(anatomy.organ, 2)[1]


def test_style_protocols(anatomy):
    included = label_errors.STYLES["neighbour"](anatomy)
    np.testing.assert_array_equal(included, anatomy.organ | anatomy.neighbours[0])
    coarse = label_errors.STYLES["coarse"](anatomy)
    assert 0.7 < coarse.sum() / anatomy.organ.sum() < 1.3 and not np.array_equal(coarse, anatomy.organ)


def test_a_vessel_runs_beside_the_organ_and_changes_nothing_else():
    plain_image, plain = phantom(24, np.random.default_rng(3))
    image, anatomy = phantom(24, np.random.default_rng(3), np.random.default_rng(9))
    vessel = anatomy.vessel
    assert not plain.vessel.any() and vessel.sum() > 100
    assert not np.any(vessel & anatomy.organ) and np.any(vessel & ndimage.binary_dilation(anatomy.organ))  # in a groove of it
    np.testing.assert_array_equal(anatomy.organ, plain.organ & ~vessel)
    np.testing.assert_array_equal(image[~vessel], plain_image[~vessel])
    assert np.median(image[vessel]) > np.median(image[anatomy.organ]) + 50  # contrast-filled, brighter than the organ
    assert vessel.any(axis=(0, 1)).sum() > anatomy.organ.any(axis=(0, 1)).sum() + 4  # runs on, head to foot


def test_the_vessel_style_adds_the_stretch_of_vessel_along_the_organ():
    anatomy = phantom(24, np.random.default_rng(3), np.random.default_rng(9))[1]
    label = label_errors.STYLES["vessel"](anatomy)
    added = label & ~anatomy.organ
    assert np.all(label[anatomy.organ]) and np.all(anatomy.vessel[added]) and added.sum() > 30
    assert np.any(anatomy.vessel & ~label)  # not the whole vessel: only where it runs along the organ
    blob = label_errors.extra(anatomy, 3, np.random.default_rng(0))[0] & ~anatomy.organ
    assert not np.any(blob & anatomy.vessel)  # a leak is tissue, not the vessel


def test_only_a_vessel_style_dataset_has_a_vessel(tmp_path):
    vessel = make_synthetic_dataset(tmp_path / "vessel", cases=4, size=16, perturbed=0.0, seed=2, style="vessel", style_fraction=0.5)
    coarse = make_synthetic_dataset(tmp_path / "coarse", cases=4, size=16, perturbed=0.0, seed=2, style="coarse", style_fraction=0.5)
    for case in ("synth_000", "synth_001", "synth_002", "synth_003"):
        with_vessel = nib.load(vessel / "imagesTr" / f"{case}_0000.nii.gz").get_fdata()
        without = nib.load(coarse / "imagesTr" / f"{case}_0000.nii.gz").get_fdata()
        assert (with_vessel > without + 40).sum() > 20 and (with_vessel < without - 40).sum() == 0


def test_settings_that_cannot_make_a_dataset_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown error kind"):
        make_synthetic_dataset(tmp_path / "a", kinds=("smudged",))
    with pytest.raises(ValueError, match="needs a style"):
        make_synthetic_dataset(tmp_path / "b", style_fraction=0.2)
    with pytest.raises(ValueError, match="add up to 1"):
        make_synthetic_dataset(tmp_path / "c", perturbed=0.8, style="coarse", style_fraction=0.3)


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
    prepared = prepare_cases(dataset, select_labels(dataset, "organ"), PreprocessConfig(roi=(12, 12, 12)), tmp_path / "cache", progress=False)
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
