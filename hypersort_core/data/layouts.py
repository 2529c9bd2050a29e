"""Readers that turn a dataset folder of any supported layout into one list of cases.

Readers only list files; they never open a volume. Images and labels are paired by case id,
and a file whose partner is missing still yields a case pointing at the expected partner path:
`prepare_cases` then reports that case as bad, so a run with skip_bad can drop it and go on.
A TotalSegmentator dataset can be cut to one of the splits its meta.csv assigns (`split`).
"""

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

LAYOUTS = ("nnunet", "msd", "totalsegmentator", "folders", "manifest")
NIFTI_ENDINGS = (".nii.gz", ".nii")
MANIFEST_SUFFIXES = (".tsv", ".csv")  # what a dataset folder's manifest is named
DATA_LIST_SUFFIXES = (*MANIFEST_SUFFIXES, ".txt")  # a list named directly may also be the reference code's .txt
TOTALSEGMENTATOR_SPLITS = ("train", "val", "test")  # the values of meta.csv's split column
TOTALSEGMENTATOR_META = "meta.csv"  # the release's subject table: image_id;age;gender;institute;study_type;split;...
META_DELIMITERS = (";", ",", "\t")  # the release uses ";"; a table re-saved by a spreadsheet may use another
NOT_MANIFESTS = {"perturbations.csv"}  # written next to synthetic datasets by make_synthetic_dataset


@dataclass
class Case:
    """One training case; `label` is a dict (structure name -> mask file) for TotalSegmentator."""

    case_id: str
    image: Path
    label: Path | dict[str, Path]


@dataclass
class Dataset:
    """The cases of a dataset, sorted by id, and the label names it declares (name -> value)."""

    root: Path  # the dataset folder, or the manifest file for layout "manifest"
    layout: str
    cases: list[Case]
    label_names: dict[str, int]

    @property
    def labels_file(self) -> Path:
        """Where the label names come from: errors about labels name this path."""
        if self.layout in ("nnunet", "msd"):
            return self.root / "dataset.json"
        return self.root

    @property
    def declared_values(self) -> set[int] | None:
        """Values a label file may hold, or None where the layout declares none."""
        if self.layout in ("nnunet", "msd"):
            return {0, *self.label_names.values()}
        return None


def read_dataset(root: Path | str, layout: str = "auto", split: str | None = None) -> Dataset:
    """List the cases of the dataset at `root`, detecting its layout unless one is forced.

    `split` keeps the TotalSegmentator subjects that meta.csv puts in that split (train, val, test).
    """
    root = Path(root).absolute()
    if not root.exists():
        raise DataError(root, "does not exist")
    if layout == "auto":
        layout = detect_layout(root)
    elif layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of auto, {', '.join(LAYOUTS)}")
    dataset = READERS[layout](root)
    if split is not None:
        dataset = subjects_in_split(dataset, split)
    if not dataset.cases:
        raise DataError(dataset.root, f"no cases found ({layout} layout)")
    dataset.cases.sort(key=lambda case: case.case_id)
    return dataset


def detect_layout(root: Path) -> str:
    """Recognise a layout by the files that only it has."""
    if root.is_file():
        return "manifest"
    if (root / "dataset.json").is_file():
        return "msd" if "training" in load_json(root / "dataset.json") else "nnunet"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "folders"
    if any((folder / "ct.nii.gz").is_file() for folder in subfolders(root)):
        return "totalsegmentator"
    if manifest_files(root):
        return "manifest"
    if not any(root.iterdir()):
        raise DataError(root, "folder is empty")
    raise DataError(
        root,
        "not a recognised dataset: expected dataset.json (nnU-Net or Medical Segmentation "
        "Decathlon), images/ and labels/ folders, subject folders with ct.nii.gz "
        "(TotalSegmentator), or one .tsv/.csv manifest",
    )


def read_nnunet(root: Path) -> Dataset:
    """nnU-Net raw: imagesTr/{case}_0000{ending} and labelsTr/{case}{ending}."""
    meta_file = root / "dataset.json"
    meta = load_json(meta_file)
    label_names = parse_label_names(meta, meta_file)
    require_single_channel(meta, meta_file)
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in NIFTI_ENDINGS:
        raise DataError(meta_file, f"file_ending {ending!r} is not supported: only NIfTI (.nii.gz, .nii)")
    if not (root / "imagesTr").is_dir():
        raise DataError(root, "has dataset.json but no imagesTr folder")
    images = {channel_zero_case_id(file, ending): file for file in files_ending(root / "imagesTr", ending)}
    labels = {file.name[: -len(ending)]: file for file in files_ending(root / "labelsTr", ending)}
    cases = []
    for case_id in images.keys() | labels.keys():
        image = images.get(case_id, root / "imagesTr" / f"{case_id}_0000{ending}")
        cases.append(Case(case_id, image, labels.get(case_id, root / "labelsTr" / f"{case_id}{ending}")))
    return Dataset(root, "nnunet", cases, label_names)


def channel_zero_case_id(file: Path, ending: str) -> str:
    """The case id of an nnU-Net image file, which must be channel 0 ({case}_0000)."""
    case_id, _, channel = file.name[: -len(ending)].rpartition("_")
    if not case_id or len(channel) != 4 or not channel.isdigit():
        raise DataError(file, "image file name lacks the _0000 channel suffix nnU-Net requires")
    if channel != "0000":
        raise DataError(file, f"is channel {int(channel)}: multi-channel input is not supported yet")
    return case_id


def read_msd(root: Path) -> Dataset:
    """Medical Segmentation Decathlon: dataset.json lists the training image/label pairs."""
    meta_file = root / "dataset.json"
    meta = load_json(meta_file)
    label_names = parse_label_names(meta, meta_file)
    require_single_channel(meta, meta_file)
    training = meta.get("training")
    if not isinstance(training, list):
        raise DataError(meta_file, '\'training\' must be a list of {"image", "label"} entries')
    cases = []
    for number, entry in enumerate(training, start=1):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(key), str) for key in ("image", "label")):
            raise DataError(meta_file, f"training entry {number} needs an 'image' and a 'label' path")
        image = root / entry["image"]
        case_id = nifti_case_id(image)
        cases.append(Case(case_id, nnunet_v1_image(image, case_id), root / entry["label"]))
    require_unique_ids(cases, meta_file)
    return Dataset(root, "msd", cases, label_names)


def nnunet_v1_image(listed: Path, case_id: str) -> Path:
    """nnU-Net v1 lists imagesTr/{case}.nii.gz in this format but names the file {case}_0000.nii.gz."""
    channel_zero = listed.with_name(f"{case_id}_0000{listed.name[len(case_id) :]}")
    return channel_zero if not listed.exists() and channel_zero.exists() else listed


def read_totalsegmentator(root: Path) -> Dataset:
    """TotalSegmentator: {subject}/ct.nii.gz and one binary mask per structure in segmentations/."""
    subjects = [folder for folder in subfolders(root) if (folder / "ct.nii.gz").is_file() or (folder / "segmentations").is_dir()]
    structures = sorted({mask.name[: -len(".nii.gz")] for subject in subjects for mask in files_ending(subject / "segmentations", ".nii.gz")})
    if not structures:
        raise DataError(root, "no segmentations/*.nii.gz masks found in the subject folders")
    cases = [Case(subject.name, subject / "ct.nii.gz", {name: subject / "segmentations" / f"{name}.nii.gz" for name in structures}) for subject in subjects]
    label_names = {name: value for value, name in enumerate(structures, start=1)}
    return Dataset(root, "totalsegmentator", cases, label_names)


def subjects_in_split(dataset: Dataset, split: str) -> Dataset:
    """The TotalSegmentator subjects meta.csv puts in `split`.

    Structures stay numbered as in the whole dataset, so label values mean the same in every split.
    Subjects meta.csv lists without a folder (a partial download) are left out, as are folders it does
    not list (they belong to no split); a split none of whose subjects has a folder is an error.
    """
    if dataset.layout != "totalsegmentator":
        problem = f"--split picks TotalSegmentator subjects by meta.csv; this is a {dataset.layout} dataset"
        raise DataError(dataset.root, problem)
    meta = dataset.root / TOTALSEGMENTATOR_META
    splits = read_subject_splits(meta)
    wanted = split.strip().casefold()
    listed = {subject for subject, subject_split in splits.items() if subject_split.casefold() == wanted}
    if not listed:
        found = ", ".join(sorted(set(splits.values()))) or "none"
        raise DataError(meta, f"no subject is in split {split!r} (its splits: {found})")
    cases = [case for case in dataset.cases if case.case_id in listed]
    if not cases:
        raise DataError(meta, f"none of the {len(listed)} subjects of split {split!r} has a folder in {dataset.root}")
    return Dataset(dataset.root, dataset.layout, cases, dataset.label_names)


def read_subject_splits(meta: Path) -> dict[str, str]:
    """{image_id: split} from TotalSegmentator's meta.csv (semicolon-separated, with a byte-order mark)."""
    if not meta.is_file():
        raise DataError(meta, "is missing: --split picks subjects by the split column of this table")
    try:
        lines = [line for line in meta.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(meta, f"cannot read it ({error})") from error
    if not lines:
        raise DataError(meta, "is empty: --split needs its image_id and split columns")
    delimiter = next((mark for mark in META_DELIMITERS if mark in lines[0]), ";")
    try:
        rows = list(csv.reader(lines, delimiter=delimiter))
    except csv.Error as error:
        raise DataError(meta, f"cannot parse it ({error})") from error
    header = [name.strip().lower() for name in rows[0]]
    for column in ("image_id", "split"):
        if column not in header:
            found = ", ".join(rows[0])
            raise DataError(meta, f"has no {column} column (found: {found}); --split needs image_id and split")
    subject_at, split_at = header.index("image_id"), header.index("split")
    return {row[subject_at].strip(): row[split_at].strip() for row in rows[1:] if len(row) > max(subject_at, split_at) and row[subject_at].strip()}


def read_folders(root: Path) -> Dataset:
    """images/ and labels/ holding NIfTI files with matching names."""
    images = nifti_files_by_case(root / "images")
    labels = nifti_files_by_case(root / "labels")
    cases = []
    for case_id in images.keys() | labels.keys():
        name = (images.get(case_id) or labels[case_id]).name
        image = images.get(case_id, root / "images" / name)
        cases.append(Case(case_id, image, labels.get(case_id, root / "labels" / name)))
    return Dataset(root, "folders", cases, {})


def read_manifest(root: Path) -> Dataset:
    """A TSV/CSV table (or the reference code's tab-separated .txt data list) of image and label paths.

    Relative paths start from the folder `listed_paths_base` finds: the list's own for our manifests,
    the reference checkout's root for its data_files/*.txt lists.
    """
    manifest = root if root.is_file() else single_manifest(root)
    if manifest.suffix.lower() not in DATA_LIST_SUFFIXES:
        raise DataError(manifest, "is a file but not a .tsv, .csv or .txt data list")
    rows = read_table(manifest)
    columns = {name.strip().lower(): name for name in rows[0]}
    image_column = first_present(columns, ("datapath", "image"))
    label_column = first_present(columns, ("labelpath", "label"))
    case_column = first_present(columns, ("case", "case_id"))
    if image_column is None or label_column is None:
        raise DataError(
            manifest,
            f"needs columns DataPath and LabelPath (or image and label); found {', '.join(rows[0].keys())}",
        )
    listed = []  # (row number, image, label, case id or "")
    for number, row in enumerate(rows, start=2):  # row 1 is the header
        image, label = ((row[column] or "").strip() for column in (image_column, label_column))
        if not image or not label:
            raise DataError(manifest, f"row {number} lacks an image or a label path")
        listed.append((number, image, label, (row[case_column] or "").strip() if case_column else ""))
    base = listed_paths_base(manifest, [(number, image) for number, image, _, _ in listed])
    cases = []
    for number, image, label, case_id in listed:
        image_path = base / image
        case_id = case_id or nifti_case_id(image_path)
        if "/" in case_id or "\\" in case_id:
            raise DataError(manifest, f"case id {case_id!r} in row {number} contains a path separator")
        cases.append(Case(case_id, image_path, base / label))
    require_unique_ids(cases, manifest)
    return Dataset(manifest, "manifest", cases, {})


def listed_paths_base(manifest: Path, images: list[tuple[int, str]]) -> Path:
    """The folder a data list's relative paths start from: its own, or the nearest above it that holds them.

    The reference code opens its list's paths from the folder it runs in, its checkout's root, while the
    list lies in data_files/ below it. The first folder, from the list's own upwards, in which any listed
    image exists serves every row, so the answer depends on the files alone and every later command that
    reads the list finds the same ones. A row missing there stays a case, which `hsort check` reports.
    """
    relative = [(number, image) for number, image in images if not Path(image).is_absolute()]
    if not relative:
        return manifest.parent
    for folder in (manifest.parent, *manifest.parent.parents):
        if any((folder / image).is_file() for _, image in relative):
            return folder
    number, image = relative[0]
    raise DataError(
        manifest,
        f"image {image} (row {number}) is not found relative to {manifest.parent} or any folder above it, "
        "and neither is any other image it lists; keep the list inside the folder tree that holds the data, or write absolute paths",
    )


def read_table(manifest: Path) -> list[dict[str, str]]:
    """Rows of a manifest; tab-separated when the header holds a tab, else comma-separated."""
    try:
        lines = manifest.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark is no header text
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(manifest, f"cannot read the manifest ({error})") from error
    content = [line for line in lines if line.strip()]
    if len(content) < 2:
        raise DataError(manifest, "manifest has no rows")
    delimiter = "\t" if "\t" in content[0] else ","
    try:
        rows = list(csv.DictReader(content, delimiter=delimiter))
    except csv.Error as error:
        raise DataError(manifest, f"cannot parse the manifest ({error})") from error
    if not rows:  # an unclosed quote swallows every line after the header
        raise DataError(manifest, "manifest has no rows")
    for number, row in enumerate(rows, start=2):
        if None in row:  # csv's key for the cells beyond the header's
            raise DataError(manifest, f"row {number} has more cells than the header")
    return rows


def single_manifest(folder: Path) -> Path:
    """The one manifest in a folder; several are ambiguous."""
    manifests = manifest_files(folder)
    if len(manifests) != 1:
        found = ", ".join(file.name for file in manifests) or "none"
        raise DataError(folder, f"needs exactly one .tsv/.csv manifest; found {found}")
    return manifests[0]


def manifest_files(folder: Path) -> list[Path]:
    return sorted(file for file in folder.iterdir() if file.is_file() and file.suffix.lower() in MANIFEST_SUFFIXES and file.name not in NOT_MANIFESTS)


def parse_label_names(meta: dict, meta_file: Path) -> dict[str, int]:
    """Foreground label names -> values, from nnU-Net's name->value or the Decathlon's value->name."""
    labels = meta.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise DataError(meta_file, "has no 'labels' mapping")
    if all(key.isdecimal() for key in labels):  # not isdigit: '¹' is a digit that int() refuses
        pairs = {str(name): int(value) for value, name in labels.items()}
    else:
        pairs = dict(labels)
    for name, value in pairs.items():
        if isinstance(value, list):
            raise DataError(meta_file, f"label {name!r} is the region {value}: region-based labels are not supported")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DataError(meta_file, f"label {name!r} has value {value!r}; label values must be integers >= 0")
    if len(set(pairs.values())) != len(pairs):
        raise DataError(meta_file, "two label names share one value")
    return {name: value for name, value in pairs.items() if value != 0}


def require_single_channel(meta: dict, meta_file: Path) -> None:
    channels = meta.get("channel_names") or meta.get("modality") or {}
    if not isinstance(channels, dict):
        problem = f"'channel_names' (or 'modality') must map channel numbers to names, not a {type(channels).__name__}"
        raise DataError(meta_file, problem)
    if len(channels) > 1:
        names = ", ".join(str(name) for name in channels.values())
        problem = f"declares {len(channels)} channels ({names}): multi-channel input is not supported yet"
        raise DataError(meta_file, problem)


def require_unique_ids(cases: list[Case], source: Path) -> None:
    seen = set()
    for case in cases:
        if case.case_id in seen:
            raise DataError(source, f"case id {case.case_id!r} appears twice")
        seen.add(case.case_id)


def load_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(path, f"cannot read JSON ({error})") from error
    if not isinstance(content, dict):
        raise DataError(path, "must hold a JSON object")
    return content


def nifti_case_id(file: Path) -> str:
    """A case id is the file name without its NIfTI ending."""
    for ending in NIFTI_ENDINGS:
        if file.name.endswith(ending):
            return file.name[: -len(ending)]
    raise DataError(file, "is not a NIfTI file (.nii.gz or .nii)")


def nifti_files_by_case(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(folder, "folder is missing")
    files = {}
    for file in files_ending(folder, NIFTI_ENDINGS):
        case_id = nifti_case_id(file)
        if case_id in files:
            raise DataError(file, f"case id {case_id!r} also names {files[case_id].name}")
        files[case_id] = file
    return files


def files_ending(folder: Path, endings: str | tuple[str, ...]) -> list[Path]:
    """Files with one of the endings, skipping hidden ones (such as macOS's ._ copies)."""
    if not folder.is_dir():
        return []
    return sorted(file for file in folder.iterdir() if file.name.endswith(endings) and not file.name.startswith(".") and file.is_file())


def subfolders(root: Path) -> list[Path]:
    return sorted(folder for folder in root.iterdir() if folder.is_dir())


def first_present(columns: dict[str, str], candidates: tuple[str, ...]) -> str | None:
    return next((columns[name] for name in candidates if name in columns), None)


READERS = {
    "nnunet": read_nnunet,
    "msd": read_msd,
    "totalsegmentator": read_totalsegmentator,
    "folders": read_folders,
    "manifest": read_manifest,
}
