"""Each dataset layout is read into the same sorted list of cases, and labels are selected by name
or value."""

import pytest
from dataset_writers import (
    write_folders,
    write_manifest,
    write_msd,
    write_nnunet,
    write_reference_checkout,
    write_totalsegmentator,
    write_totalsegmentator_meta,
)

from hypersort_core.check import check_dataset
from hypersort_core.data import DataError, PreprocessConfig, prepare_cases, read_dataset, select_labels


def test_nnunet_cases_pair_channel_zero_images_with_labels(tmp_path):
    root = write_nnunet(tmp_path, n_cases=3, labels={"liver": 1, "spleen": 2})
    dataset = read_dataset(root)
    assert dataset.layout == "nnunet"
    assert [case.case_id for case in dataset.cases] == ["case_000", "case_001", "case_002"]
    assert dataset.cases[1].image == root / "imagesTr" / "case_001_0000.nii.gz"
    assert dataset.cases[1].label == root / "labelsTr" / "case_001.nii.gz"
    assert dataset.label_names == {"liver": 1, "spleen": 2}


def test_msd_labels_map_values_to_names(tmp_path):
    root = write_msd(tmp_path, n_cases=2, labels={"liver": 1, "tumour": 2})
    dataset = read_dataset(root)
    assert dataset.layout == "msd"
    assert [case.case_id for case in dataset.cases] == ["organ_000", "organ_001"]
    assert dataset.cases[0].label == root / "labelsTr" / "organ_000.nii.gz"
    assert dataset.label_names == {"liver": 1, "tumour": 2}


def test_totalsegmentator_labels_are_the_structure_files_in_sorted_order(tmp_path):
    root = write_totalsegmentator(tmp_path, n_cases=2, structures=("spleen", "liver", "aorta"))
    (root / "meta.csv").write_text("image_id;split\ns0000;train\n")  # as in the real release
    dataset = read_dataset(root)
    assert dataset.layout == "totalsegmentator"
    assert [case.case_id for case in dataset.cases] == ["s0000", "s0001"]
    assert dataset.label_names == {"aorta": 1, "liver": 2, "spleen": 3}
    assert dataset.cases[0].label["liver"] == root / "s0000" / "segmentations" / "liver.nii.gz"


def test_folders_pair_files_by_name(tmp_path):
    root = write_folders(tmp_path, n_cases=2)
    dataset = read_dataset(root)
    assert dataset.layout == "folders"
    assert [(case.image.name, case.label.name) for case in dataset.cases] == [
        ("case_000.nii.gz", "case_000.nii.gz"),
        ("case_001.nii.gz", "case_001.nii.gz"),
    ]
    assert dataset.label_names == {}


def test_tsv_manifest_paths_are_relative_to_its_folder(tmp_path):
    manifest = write_manifest(tmp_path, n_cases=2)
    dataset = read_dataset(manifest)
    assert dataset.layout == "manifest"
    assert dataset.root == manifest
    assert [case.case_id for case in dataset.cases] == ["scan_000", "scan_001"]
    assert dataset.cases[0].label == tmp_path / "volumes" / "scan_000_seg.nii.gz"


def test_csv_manifest_with_case_column_is_found_in_its_folder(tmp_path):
    write_manifest(tmp_path, n_cases=3, header=("image", "label", "case"), delimiter=",")
    dataset = read_dataset(tmp_path)
    assert dataset.root == tmp_path / "data.csv"
    assert [case.case_id for case in dataset.cases] == ["patient0", "patient1", "patient2"]


def test_cases_are_sorted_by_id_not_by_manifest_row(tmp_path):
    manifest = write_manifest(tmp_path, n_cases=3)
    header, *rows = manifest.read_text().splitlines()
    manifest.write_text("\n".join([header, *reversed(rows)]) + "\n")
    assert [case.case_id for case in read_dataset(manifest).cases] == ["scan_000", "scan_001", "scan_002"]


def test_a_folder_with_several_manifests_is_ambiguous(tmp_path):
    write_manifest(tmp_path, n_cases=1)
    write_manifest(tmp_path, n_cases=1, delimiter=",")
    with pytest.raises(DataError, match="exactly one .tsv/.csv manifest; found data.csv, data.tsv") as error:
        read_dataset(tmp_path)
    assert error.value.path == tmp_path


def test_a_forced_layout_overrides_detection(tmp_path):
    write_nnunet(tmp_path, n_cases=2)
    write_manifest(tmp_path, n_cases=1)
    assert read_dataset(tmp_path).layout == "nnunet"
    assert read_dataset(tmp_path, layout="manifest").layout == "manifest"
    with pytest.raises(ValueError, match="unknown layout"):
        read_dataset(tmp_path, layout="dicom")


def test_labels_are_selected_by_name_or_value(tmp_path):
    dataset = read_dataset(write_nnunet(tmp_path, n_cases=1, labels={"liver": 1, "spleen": 2, "kidney": 3}))
    by_name = select_labels(dataset, "spleen, liver")
    assert (by_name.names, by_name.values, by_name.num_classes) == (["spleen", "liver"], [2, 1], 3)
    by_value = select_labels(dataset, "3")
    assert (by_value.names, by_value.values, by_value.num_classes) == (["kidney"], [3], 2)


def test_no_selection_is_binary_foreground(tmp_path):
    dataset = read_dataset(write_nnunet(tmp_path, n_cases=1, labels={"liver": 1, "spleen": 2}))
    selection = select_labels(dataset, None)
    assert (selection.names, selection.is_binary, selection.num_classes) == (["foreground"], True, 2)


def test_totalsegmentator_structures_are_selected_by_name_or_number(tmp_path):
    dataset = read_dataset(write_totalsegmentator(tmp_path, n_cases=1, structures=("liver", "spleen")))
    assert select_labels(dataset, "spleen").values == [2]
    assert select_labels(dataset, "1").names == ["liver"]


def test_datasets_without_label_names_select_by_value(tmp_path):
    dataset = read_dataset(write_folders(tmp_path, n_cases=1))
    selection = select_labels(dataset, "1,4")
    assert (selection.names, selection.values) == (["1", "4"], [1, 4])


def test_a_label_selected_twice_is_refused(tmp_path):
    dataset = read_dataset(write_nnunet(tmp_path, n_cases=1, labels={"liver": 1}))
    with pytest.raises(DataError, match="selected twice"):
        select_labels(dataset, "liver,1")


def test_nnunet_v1_lists_images_without_their_channel_suffix(tmp_path):
    root = write_msd(tmp_path, n_cases=1)
    listed = root / "imagesTr" / "organ_000.nii.gz"
    listed.rename(root / "imagesTr" / "organ_000_0000.nii.gz")
    case = read_dataset(root).cases[0]
    assert (case.case_id, case.image.name) == ("organ_000", "organ_000_0000.nii.gz")


# --- the reference code's data lists --------------------------------------------------------------


def test_reference_data_list_is_read_from_its_checkout_root(tmp_path):
    """data_files/data_list_TS.txt lists paths relative to the checkout's root, where the reference runs."""
    checkout = tmp_path / "HyperSORT"
    data_list = write_reference_checkout(checkout, n_cases=3)
    dataset = read_dataset(data_list)
    assert (dataset.layout, dataset.root) == ("manifest", data_list)
    assert [case.case_id for case in dataset.cases] == ["0", "1", "2"]
    assert dataset.cases[1].image == checkout / "path_TS_dataset" / "images" / "1.nii.gz"
    assert dataset.cases[1].label == checkout / "path_TS_dataset" / "labels" / "1.nii.gz"
    report = check_dataset(data_list)  # what `hsort fit` runs first
    assert (report.errors, [case.status for case in report.cases]) == ([], ["ok"] * 3)


def test_reference_list_may_point_beside_the_checkout(tmp_path):
    """A user who keeps the data next to the checkout writes ../ paths, still relative to the checkout's root."""
    data_list = write_reference_checkout(tmp_path / "HyperSORT", n_cases=2)
    (tmp_path / "HyperSORT" / "path_TS_dataset").rename(tmp_path / "TotalSegmentator_converted")
    data_list.write_text(data_list.read_text().replace("path_TS_dataset/", "../TotalSegmentator_converted/"))
    dataset = read_dataset(data_list)
    assert dataset.cases[0].image.resolve() == tmp_path / "TotalSegmentator_converted" / "images" / "0.nii.gz"


def test_a_row_missing_from_the_found_folder_stays_a_case_that_check_reports(tmp_path):
    checkout = tmp_path / "HyperSORT"
    data_list = write_reference_checkout(checkout, n_cases=3)
    (checkout / "path_TS_dataset" / "images" / "0.nii.gz").unlink()
    dataset = read_dataset(data_list)
    assert dataset.cases[0].image == checkout / "path_TS_dataset" / "images" / "0.nii.gz"
    assert [issue.file for issue in check_dataset(data_list).errors] == [dataset.cases[0].image]


def test_a_reference_list_whose_images_are_nowhere_is_one_error_naming_the_list_and_the_path(tmp_path):
    data_list = write_reference_checkout(tmp_path / "HyperSORT", n_cases=2)
    data_list.rename(tmp_path / "data_list_TS.txt")  # copied out of the checkout: no folder above holds the data
    with pytest.raises(DataError, match="path_TS_dataset/images/0.nii.gz \\(row 2\\) is not found") as error:
        read_dataset(tmp_path / "data_list_TS.txt")
    assert error.value.path == tmp_path / "data_list_TS.txt"
    assert "\n" not in str(error.value)


def test_a_named_file_that_is_no_data_list_is_refused(tmp_path):
    image = write_folders(tmp_path, n_cases=1) / "images" / "case_000.nii.gz"
    with pytest.raises(DataError, match="not a .tsv, .csv or .txt data list"):
        read_dataset(image)


# --- TotalSegmentator splits and masks ------------------------------------------------------------

SPLITS = {"s0000": "train", "s0001": "val", "s0002": "train", "s0003": "test", "s0099": "train"}


def test_split_keeps_the_subjects_meta_csv_puts_in_it(tmp_path):
    """s0099 has no folder (a partial download), s0004 no row: neither is in any split."""
    root = write_totalsegmentator(tmp_path, n_cases=5, structures=("spleen", "liver"))
    write_totalsegmentator_meta(root, SPLITS)
    whole = read_dataset(root)
    assert [case.case_id for case in whole.cases] == ["s0000", "s0001", "s0002", "s0003", "s0004"]
    train = read_dataset(root, split="train")
    assert [case.case_id for case in train.cases] == ["s0000", "s0002"]
    assert [case.case_id for case in read_dataset(root, "totalsegmentator", split="val").cases] == ["s0001"]
    assert train.label_names == whole.label_names == {"liver": 1, "spleen": 2}


def test_split_reads_a_meta_csv_resaved_with_commas(tmp_path):
    root = write_totalsegmentator(tmp_path, n_cases=2)
    (root / "meta.csv").write_text("image_id,age,split\ns0000,40,test\ns0001,50,train\n")
    assert [case.case_id for case in read_dataset(root, split="test").cases] == ["s0000"]


def without_meta(root):
    (root / "meta.csv").unlink()


def without_split_column(root):
    (root / "meta.csv").write_text("image_id;age;gender\ns0000;40;f\n")


def only_other_splits(root):
    write_totalsegmentator_meta(root, {"s0000": "train", "s0001": "val"})


def only_subjects_without_folders(root):
    write_totalsegmentator_meta(root, {"s0000": "train", "s0500": "test", "s0501": "test"})


@pytest.mark.parametrize(
    "break_it, problem",
    [
        (without_meta, "is missing"),
        (without_split_column, "has no split column \\(found: image_id, age, gender\\)"),
        (only_other_splits, "no subject is in split 'test' \\(its splits: train, val\\)"),
        (only_subjects_without_folders, "none of the 2 subjects of split 'test' has a folder"),
    ],
    ids=["no meta.csv", "no split column", "no subject in the split", "no folder of the split"],
)
def test_a_split_that_cannot_be_taken_is_one_error_naming_meta_csv(tmp_path, break_it, problem):
    root = write_totalsegmentator(tmp_path, n_cases=2)
    write_totalsegmentator_meta(root, SPLITS)
    break_it(root)
    with pytest.raises(DataError, match=problem) as error:
        read_dataset(root, split="test")
    assert error.value.path == root / "meta.csv"
    assert "\n" not in str(error.value)


def test_split_is_refused_for_a_dataset_without_subject_splits(tmp_path):
    root = write_nnunet(tmp_path, n_cases=2)
    with pytest.raises(DataError, match="--split picks TotalSegmentator subjects by meta.csv; this is a nnunet dataset"):
        read_dataset(root, split="train")


def test_selected_structures_are_read_without_opening_the_other_masks(tmp_path):
    """Of a subject's many masks only the chosen ones are opened: a corrupt unchosen one does not matter."""
    root = write_totalsegmentator(tmp_path, n_cases=2, structures=("liver", "spleen", "kidney_left", "aorta"))
    corrupt = root / "s0000" / "segmentations" / "spleen.nii.gz"
    corrupt.write_bytes(b"not a NIfTI file")
    (root / "s0001" / "segmentations" / "aorta.nii.gz").write_bytes(b"")
    dataset = read_dataset(root)
    for labels in ("liver", "liver,kidney_left"):
        assert check_dataset(root, label=labels).errors == []
        prepared = prepare_cases(dataset, select_labels(dataset, labels), PreprocessConfig(roi=(8, 8, 8)), tmp_path / "cache", progress=False)
        assert [case.case_id for case in prepared.cases] == ["s0000", "s0001"]
    assert [issue.file for issue in check_dataset(root, label="spleen").errors] == [corrupt]
