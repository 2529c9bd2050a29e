"""Each dataset layout is read into the same sorted list of cases, and labels are selected by name
or value."""

import pytest
from dataset_writers import (
    write_folders,
    write_manifest,
    write_msd,
    write_nnunet,
    write_totalsegmentator,
)

from hypersort_core.data import DataError, read_dataset, select_labels


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
