"""Writers of small datasets in every layout the readers support, for tests of the data pipeline
and of the CLI. Every case holds one box per label value, placed differently per case."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (12, 12, 12)
AFFINE = np.array([[-1.5, 0, 0, 10.0], [0, -1.5, 0, -20.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """One NIfTI file (parents created), with the test affine unless one is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE if affine is None else affine), path)
    return path


def phantom(index: int, shape=SHAPE, values=(1,)) -> tuple[np.ndarray, np.ndarray]:
    """An int16 image and a uint8 label map: a 3-voxel box per value, brighter than a smooth ramp."""
    label = np.zeros(shape, dtype=np.uint8)
    for number, value in enumerate(values):
        start = (1 + 4 * number, 2 + index % 3, 3)
        label[start[0] : start[0] + 3, start[1] : start[1] + 3, start[2] : start[2] + 3] = value
    ramp = np.indices(shape).sum(axis=0)
    image = (ramp * 5 + (label > 0) * 200 - 100).astype(np.int16)
    return image, label


def write_nnunet(root: Path, n_cases: int = 3, shape=SHAPE, affine=None, labels: dict[str, int] | None = None) -> Path:
    """nnU-Net raw: dataset.json, imagesTr/case_XXX_0000.nii.gz, labelsTr/case_XXX.nii.gz."""
    labels = labels or {"organ": 1}
    meta = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **labels},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    write_json(root / "dataset.json", meta)
    for index in range(n_cases):
        image, label = phantom(index, shape, tuple(labels.values()))
        write_nifti(root / "imagesTr" / f"case_{index:03d}_0000.nii.gz", image, affine)
        write_nifti(root / "labelsTr" / f"case_{index:03d}.nii.gz", label, affine)
    return root


def write_msd(root: Path, n_cases: int = 3, shape=SHAPE, affine=None, labels: dict[str, int] | None = None) -> Path:
    """Medical Segmentation Decathlon: dataset.json with a training list and value -> name labels."""
    labels = labels or {"organ": 1}
    training = []
    for index in range(n_cases):
        image, label = phantom(index, shape, tuple(labels.values()))
        name = f"organ_{index:03d}.nii.gz"
        write_nifti(root / "imagesTr" / name, image, affine)
        write_nifti(root / "labelsTr" / name, label, affine)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(value): name for name, value in labels.items()}},
        "training": training,
    }
    write_json(root / "dataset.json", meta)
    return root


def write_totalsegmentator(root: Path, n_cases: int = 3, shape=SHAPE, affine=None, structures: tuple[str, ...] = ("liver", "spleen")) -> Path:
    """TotalSegmentator: sXXXX/ct.nii.gz and sXXXX/segmentations/{structure}.nii.gz binary masks."""
    for index in range(n_cases):
        image, label = phantom(index, shape, tuple(range(1, len(structures) + 1)))
        subject = root / f"s{index:04d}"
        write_nifti(subject / "ct.nii.gz", image, affine)
        for value, structure in enumerate(structures, start=1):
            write_nifti(subject / "segmentations" / f"{structure}.nii.gz", (label == value).astype(np.uint8), affine)
    return root


def write_folders(root: Path, n_cases: int = 3, shape=SHAPE, affine=None) -> Path:
    """images/ and labels/ with matching file names."""
    for index in range(n_cases):
        image, label = phantom(index, shape)
        write_nifti(root / "images" / f"case_{index:03d}.nii.gz", image, affine)
        write_nifti(root / "labels" / f"case_{index:03d}.nii.gz", label, affine)
    return root


def write_case(root: Path, image: np.ndarray, label: np.ndarray, affine=None, label_affine=None, case_id: str = "case") -> Path:
    """A one-case dataset in the folders layout from the given arrays (and affines)."""
    write_nifti(root / "images" / f"{case_id}.nii.gz", image, affine)
    write_nifti(root / "labels" / f"{case_id}.nii.gz", label, affine if label_affine is None else label_affine)
    return root


def write_manifest(root: Path, n_cases: int = 3, shape=SHAPE, affine=None, header=("DataPath", "LabelPath"), delimiter: str = "\t") -> Path:
    """volumes/ and a manifest of relative paths; a third header entry adds a case-id column."""
    rows = []
    for index in range(n_cases):
        image, label = phantom(index, shape)
        write_nifti(root / "volumes" / f"scan_{index:03d}.nii.gz", image, affine)
        write_nifti(root / "volumes" / f"scan_{index:03d}_seg.nii.gz", label, affine)
        row = [f"volumes/scan_{index:03d}.nii.gz", f"volumes/scan_{index:03d}_seg.nii.gz", f"patient{index}"]
        rows.append(row[: len(header)])
    manifest = root / ("data.tsv" if delimiter == "\t" else "data.csv")
    with open(manifest, "w", newline="") as file:
        csv.writer(file, delimiter=delimiter).writerows([header, *rows])
    return manifest


REFERENCE_LIST_HEADER = "DataPath\tLabelPath"  # the header of the reference code's data_files/data_list_TS.txt
TOTALSEGMENTATOR_META_HEADER = (  # meta.csv of the TotalSegmentator v2 release
    "image_id;age;gender;institute;study_type;split;manufacturer;scanner_model;kvp;pathology;pathology_location"
)


def write_reference_checkout(root: Path, n_cases: int = 3, shape=SHAPE, affine=None) -> Path:
    """A checkout of the reference code as its users fill it: data_files/data_list_TS.txt, laid out like the
    repository's own (tab-separated, CRLF, no final newline), listing path_TS_dataset/{images,labels}/{i}.nii.gz
    relative to the checkout's root, where its main.py runs. Returns the list."""
    rows = [REFERENCE_LIST_HEADER]
    for index in range(n_cases):
        image, label = phantom(index, shape)
        write_nifti(root / "path_TS_dataset" / "images" / f"{index}.nii.gz", image, affine)
        write_nifti(root / "path_TS_dataset" / "labels" / f"{index}.nii.gz", label, affine)
        rows.append(f"path_TS_dataset/images/{index}.nii.gz\tpath_TS_dataset/labels/{index}.nii.gz")
    data_list = root / "data_files" / "data_list_TS.txt"
    data_list.parent.mkdir(parents=True, exist_ok=True)
    data_list.write_bytes("\r\n".join(rows).encode())
    return data_list


def write_totalsegmentator_meta(root: Path, splits: dict[str, str]) -> Path:
    """meta.csv as the TotalSegmentator release has it (UTF-8 with a byte-order mark, ';'), one row per
    {image_id: split}."""
    rows = [TOTALSEGMENTATOR_META_HEADER]
    rows += [f"{subject};63;m;A;ct abdomen-pelvis;{split};siemens;SOMATOM;120;no_pathology;" for subject, split in splits.items()]
    meta = root / "meta.csv"
    meta.write_bytes(("\ufeff" + "\n".join(rows) + "\n").encode())
    return meta


def write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2))
