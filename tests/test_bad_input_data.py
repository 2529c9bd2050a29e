"""Bad input data fails with a DataError that names the file and the problem, or is skipped."""

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
from dataset_writers import (
    AFFINE,
    phantom,
    write_case,
    write_folders,
    write_manifest,
    write_nifti,
    write_nnunet,
    write_totalsegmentator,
)

from hypersort_core.data import (
    DataError,
    PreprocessConfig,
    prepare_cases,
    read_dataset,
    select_labels,
)

CONFIG = PreprocessConfig(roi=(8, 8, 8))


def prepare(root, cache, **options):
    dataset = read_dataset(root)
    return prepare_cases(dataset, select_labels(dataset, None), CONFIG, cache, progress=False, **options)


def data_error(root, cache) -> DataError:
    with pytest.raises(DataError) as error:
        prepare(root, cache)
    return error.value


def test_error_names_the_file_and_the_problem():
    error = DataError("/data/case.nii.gz", "image holds 3 NaN or infinite voxels")
    assert str(error) == "/data/case.nii.gz: image holds 3 NaN or infinite voxels"
    assert (str(error.path), error.problem) == ("/data/case.nii.gz", "image holds 3 NaN or infinite voxels")


def test_missing_label_for_an_image(tmp_path):
    root = write_nnunet(tmp_path / "data")
    missing = root / "labelsTr" / "case_001.nii.gz"
    missing.unlink()
    error = data_error(root, tmp_path / "cache")
    assert error.path == missing
    assert "label file is missing for image" in error.problem and "case_001_0000.nii.gz" in error.problem


def test_missing_image_for_a_label(tmp_path):
    root = write_folders(tmp_path / "data")
    missing = root / "images" / "case_002.nii.gz"
    missing.unlink()
    error = data_error(root, tmp_path / "cache")
    assert (error.path, error.problem) == (missing, "image file is missing for case 'case_002'")


def test_missing_totalsegmentator_mask(tmp_path):
    root = write_totalsegmentator(tmp_path / "data", n_cases=2)
    missing = root / "s0001" / "segmentations" / "spleen.nii.gz"
    missing.unlink()
    assert data_error(root, tmp_path / "cache").path == missing


def test_label_of_another_shape(tmp_path):
    image, label = phantom(0)
    root = write_case(tmp_path / "data", image, label[:, :, :10])
    error = data_error(root, tmp_path / "cache")
    assert error.path == root / "labels" / "case.nii.gz"
    assert "label shape (12, 12, 10) differs from the image's (12, 12, 12)" in error.problem


def test_label_on_another_grid(tmp_path):
    image, label = phantom(0)
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    root = write_case(tmp_path / "data", image, label, AFFINE, label_affine=shifted)
    error = data_error(root, tmp_path / "cache")
    assert error.path == root / "labels" / "case.nii.gz"
    assert "label affine differs from the image's by up to 0.5" in error.problem


def test_affines_equal_up_to_rounding_are_accepted(tmp_path):
    image, label = phantom(0)
    rounded = AFFINE + 1e-5
    rounded[3] = [0, 0, 0, 1]
    root = write_case(tmp_path / "data", image, label, AFFINE, label_affine=rounded)
    assert len(prepare(root, tmp_path / "cache").cases) == 1


def test_label_values_not_declared_in_dataset_json(tmp_path):
    root = write_nnunet(tmp_path / "data", labels={"liver": 1})
    label_file = root / "labelsTr" / "case_000.nii.gz"
    label = np.asarray(nib.load(label_file).dataobj).copy()
    label[0, 0, 0], label[0, 0, 1] = 3, 7
    write_nifti(label_file, label)
    error = data_error(root, tmp_path / "cache")
    assert error.path == label_file
    assert error.problem == "label values 3, 7 are not declared in dataset.json (declared: 0, 1)"


def test_fractional_label_values(tmp_path):
    image, label = phantom(0)
    root = write_case(tmp_path / "data", image, label * np.float32(0.5))
    assert "non-integer values 0.5" in data_error(root, tmp_path / "cache").problem


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_in_an_image(tmp_path, value):
    image, label = phantom(0)
    image = image.astype(np.float32)
    image[3, 4, 5] = value
    root = write_case(tmp_path / "data", image, label)
    error = data_error(root, tmp_path / "cache")
    assert (error.path, error.problem) == (root / "images" / "case.nii.gz", "image holds 1 NaN or infinite voxels")


def test_two_dimensional_image(tmp_path):
    image, label = phantom(0)
    root = write_case(tmp_path / "data", image[:, :, 0], label[:, :, 0])
    assert "volume is 2-D (shape (12, 12)); a 3-D volume is needed" in data_error(root, tmp_path / "cache").problem


def test_four_dimensional_image(tmp_path):
    image, label = phantom(0)
    root = write_case(tmp_path / "data", np.stack([image, image], axis=-1), label)
    assert "multi-channel or time-series volumes are not supported" in data_error(root, tmp_path / "cache").problem


def test_trailing_singleton_dimension_is_accepted(tmp_path):
    image, label = phantom(0)
    root = write_case(tmp_path / "data", image[..., None], label[..., None])
    assert len(prepare(root, tmp_path / "cache").cases) == 1


def test_truncated_nifti(tmp_path):
    root = write_folders(tmp_path / "data", n_cases=1)
    image_file = root / "images" / "case_000.nii.gz"
    image_file.write_bytes(image_file.read_bytes()[:-40])
    error = data_error(root, tmp_path / "cache")
    assert error.path == image_file and "truncated or corrupt NIfTI data" in error.problem


def test_file_that_is_not_nifti(tmp_path):
    root = write_folders(tmp_path / "data", n_cases=1)
    label_file = root / "labels" / "case_000.nii.gz"
    label_file.write_bytes(gzip.compress(b"not an image at all"))
    error = data_error(root, tmp_path / "cache")
    assert error.path == label_file and "not a readable NIfTI file" in error.problem


def test_empty_folder(tmp_path):
    with pytest.raises(DataError) as error:
        read_dataset(tmp_path)
    assert (error.value.path, error.value.problem) == (tmp_path, "folder is empty")


def test_unrecognised_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("scans are elsewhere")
    with pytest.raises(DataError, match="not a recognised dataset") as error:
        read_dataset(tmp_path)
    assert error.value.path == tmp_path


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_dataset(tmp_path / "nowhere")


def test_unknown_label_name_lists_the_known_ones(tmp_path):
    dataset = read_dataset(write_nnunet(tmp_path, labels={"liver": 1, "spleen": 2}))
    with pytest.raises(DataError) as error:
        select_labels(dataset, "liver,kidney")
    assert error.value.path == tmp_path / "dataset.json"
    assert error.value.problem == "unknown label 'kidney'; known labels: liver (1), spleen (2)"


def test_unknown_label_value(tmp_path):
    dataset = read_dataset(write_nnunet(tmp_path, labels={"liver": 1}))
    with pytest.raises(DataError, match="unknown label '4'; known labels: liver"):
        select_labels(dataset, "4")


def test_unknown_structure_names_the_folder(tmp_path):
    dataset = read_dataset(write_totalsegmentator(tmp_path, structures=("liver", "spleen")))
    with pytest.raises(DataError, match="unknown label 'aorta'; known labels: liver .1., spleen .2.") as error:
        select_labels(dataset, "aorta")
    assert error.value.path == tmp_path


def test_label_name_without_declared_names_names_the_manifest(tmp_path):
    manifest = write_manifest(tmp_path)
    with pytest.raises(DataError, match="unknown label 'liver'; known labels: none declared") as error:
        select_labels(read_dataset(manifest), "liver")
    assert error.value.path == manifest


def test_multi_channel_nnunet_dataset(tmp_path):
    root = write_nnunet(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "T1", "1": "T2"}
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="2 channels .T1, T2.: multi-channel input is not supported yet") as error:
        read_dataset(root)
    assert error.value.path == root / "dataset.json"


def test_second_channel_file_in_nnunet_dataset(tmp_path):
    root = write_nnunet(tmp_path)
    second = root / "imagesTr" / "case_000_0001.nii.gz"
    second.write_bytes((root / "imagesTr" / "case_000_0000.nii.gz").read_bytes())
    with pytest.raises(DataError, match="is channel 1: multi-channel input is not supported yet") as error:
        read_dataset(root)
    assert error.value.path == second


def test_invalid_dataset_json(tmp_path):
    root = write_nnunet(tmp_path)
    (root / "dataset.json").write_text('{"labels": {"background": 0,')
    with pytest.raises(DataError, match="cannot read JSON") as error:
        read_dataset(root)
    assert error.value.path == root / "dataset.json"


@pytest.mark.parametrize("labels", [{"¹": None}, {"²": "organ"}])
def test_dataset_json_label_keys_that_look_like_digits_but_are_not(tmp_path, labels):
    """'¹'.isdigit() is True but int('¹') fails: such a key is a name, not a Decathlon value (found by the fuzzer)."""
    root = write_nnunet(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps(meta | {"labels": labels}))
    with pytest.raises(DataError, match="label values must be integers") as error:
        read_dataset(root)
    assert error.value.path == root / "dataset.json"


def test_decathlon_label_values_as_keys_are_read(tmp_path):
    root = write_nnunet(tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps(meta | {"labels": {"0": "background", "1": "organ"}}))
    assert read_dataset(root).label_names == {"organ": 1}


def test_manifest_without_image_and_label_columns(tmp_path):
    manifest = tmp_path / "cases.csv"
    manifest.write_text("scan,mask\na.nii.gz,b.nii.gz\n")
    with pytest.raises(DataError, match="needs columns DataPath and LabelPath .or image and label.; found scan, mask"):
        read_dataset(manifest)


def test_skip_bad_drops_bad_cases_and_reports_them(tmp_path, monkeypatch):
    root = write_nnunet(tmp_path / "data", n_cases=3)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    prepared = prepare(root, tmp_path / "cache", skip_bad=True)
    assert [case.case_id for case in prepared.cases] == ["case_000", "case_002"]
    assert [error.path for error in prepared.bad] == [root / "labelsTr" / "case_001.nii.gz"]

    monkeypatch.setattr(nib, "load", lambda *_: pytest.fail("a cached case was read again"))
    again = prepare(root, tmp_path / "cache", skip_bad=True)
    assert [str(error) for error in again.bad] == [str(error) for error in prepared.bad]


def test_skip_bad_with_no_case_left(tmp_path):
    root = write_folders(tmp_path / "data", n_cases=2)
    for label_file in (root / "labels").iterdir():
        label_file.unlink()
    with pytest.raises(DataError, match="no usable case left: all 2 cases are bad") as error:
        prepare(root, tmp_path / "cache", skip_bad=True)
    assert error.value.path == root


@pytest.mark.parametrize("damage", ["none", "truncated", "corrupt", "trailing data"])
def test_isal_reads_what_nibabel_reads_and_fails_as_it_fails(tmp_path, monkeypatch, damage):
    """With the optional isal package, gzip NIfTI is decompressed by igzip: the same voxels, and for a
    damaged file the same one-line error as nibabel's own reading."""
    pytest.importorskip("isal")
    from hypersort_core.data import volumes

    path = write_nifti(tmp_path / "image.nii.gz", np.random.default_rng(0).integers(-1000, 1000, (40, 40, 40), dtype=np.int16))
    data, middle = path.read_bytes(), len(path.read_bytes()) // 2
    path.write_bytes(
        {
            "none": data,
            "truncated": data[:-40],
            "corrupt": data[:middle] + bytes(40) + data[middle + 40 :],
            "trailing data": data + gzip.compress(bytes(1000)),  # a second gzip member: the first's size no longer ends the file
        }[damage]
    )

    def read(isal: bool):
        if not isal:
            monkeypatch.setattr(volumes, "igzip", None)
        try:
            return volumes.read_voxels(volumes.open_nifti(path, "missing"), path, np.float32)
        except DataError as error:
            return str(error)

    with_isal, without = read(True), read(False)
    if isinstance(without, str):
        assert with_isal == without and "truncated or corrupt" in without
    else:
        np.testing.assert_array_equal(with_isal, without)
