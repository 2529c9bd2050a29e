"""`hsort curate`: a new nnU-Net raw dataset with a curator's decisions (review.csv) applied.

Each training case of the run is kept as it is, left out (`exclude`), or has its label replaced by a
style's prediction (`use_prediction`): the original image segmented exactly as `hsort predict` and
`hsort correct` segment it, written on the label's own grid and header. Where the run learned some of
the dataset's labels (`--label`), only those are replaced and the other structures of the label stay.

The source dataset is only read. The new dataset is built in a hidden folder beside --out and renamed
into place when complete, so a kill leaves either no dataset or a whole one (and every file in it is
written atomically). Images are linked (or copied with `copy`); labels are always copied, so that editing
a curated label can never change the source's. `curation.csv` records for every case what was done.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from hypersort_core.atomic import atomic_open, atomic_write_csv, atomic_write_text
from hypersort_core.config import ConfigError
from hypersort_core.correct import label_values
from hypersort_core.data import Case, DataError, Dataset, LabelSelection, read_dataset, select_labels
from hypersort_core.data.cache import output_file_name
from hypersort_core.data.layouts import load_json
from hypersort_core.data.volumes import open_nifti, read_case, read_voxels
from hypersort_core.decisions import EXCLUDE, MAIN_STYLE, REVIEW_NAME, USE_PREDICTION, Decision, read_decisions
from hypersort_core.predict import NNUNET_CHANNEL_SUFFIX, Probabilities, latent_probabilities, save_label, segment
from hypersort_core.run import Run
from hypersort_core.styles import cluster_latents

CURATION_NAME = "curation.csv"
ENDING = ".nii.gz"
CURATION_COLUMNS = ("case", "decision", "style", "label_source", "voxels_changed", "source_label")
UNDECIDED = "undecided"
NOT_IN_RUN = "not_in_run"  # a case of the dataset the run left out as bad
BUILDING, PREVIOUS = ".curating-", ".previous-"  # hidden folders beside --out: .{name}.curating-{pid}
DEFAULT_CHANNEL = {"0": "image"}  # layouts without dataset.json say nothing of the modality; nnU-Net then z-scores


@dataclass
class Curated:
    """What `curate` did to one case of the source dataset."""

    case: str
    decision: str
    style: str
    label_source: str  # given, prediction, left out
    voxels_changed: int
    source_label: str


@dataclass
class Curation:
    out: Path
    cases: list[Curated]

    @property
    def kept(self) -> int:
        return sum(case.label_source != "left out" for case in self.cases)


def curate_dataset(run: Run, out: Path, review: Path | None = None, copy: bool = False, overwrite: bool = False, progress: bool = True) -> Curation:
    """Write the curated dataset to `out` from the run's source dataset and the decisions of `review`."""
    review = Path(review) if review is not None else run.run_dir / REVIEW_NAME
    if not review.is_file():
        raise DataError(review, "no such review file: record decisions with hsort review first, or name one with --review")
    dataset = read_dataset(run.data, run.config.layout, split=run.config.split)
    out = Path(out).absolute()
    check_destination(out, dataset, overwrite)
    if dataset.layout == "totalsegmentator":
        raise DataError(dataset.root, "holds one mask per structure (TotalSegmentator); curate writes nnU-Net label maps from single label files only")
    decisions = read_decisions(review, run.case_ids)
    selection = select_labels(dataset, run.config.label)
    styles = style_probabilities(run, decisions, review)
    remove_abandoned_folders(out)
    building = out.parent / f".{out.name}{BUILDING}{os.getpid()}"
    try:
        cases = write_cases(run, dataset, selection, decisions, styles, building, copy, progress)
        write_dataset_json(dataset, building, sum(case.label_source != "left out" for case in cases))
        write_curation_csv(building / CURATION_NAME, cases)
        move_into_place(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return Curation(out, cases)


def check_destination(out: Path, dataset: Dataset, overwrite: bool) -> None:
    """--out may neither be nor hold nor lie in the source dataset; an existing one is replaced only with
    --overwrite, and only if it is empty or a dataset curate wrote (so that no other folder is ever deleted)."""
    source = dataset.root.resolve()
    target = out.resolve()
    if target == source or source.is_relative_to(target) or target.is_relative_to(source if source.is_dir() else source.parent):
        raise ConfigError(f"--out {out} overlaps the source dataset {dataset.root}: curate never writes into it; choose a folder outside it")
    if not out.exists():
        return
    if not overwrite:
        raise ConfigError(f"--out {out} already exists; choose a new folder or add --overwrite")
    if not out.is_dir() or (any(out.iterdir()) and not (out / CURATION_NAME).is_file()):
        raise ConfigError(f"--out {out} is not a dataset hsort curate wrote (no {CURATION_NAME}): not overwriting it")


def style_probabilities(run: Run, decisions: dict[str, Decision], review: Path) -> dict[str, Probabilities]:
    """The segmenter of every style the decisions use, checked before anything is written."""
    wanted = {decision.style for decision in decisions.values() if decision.decision == USE_PREDICTION}
    latents = {MAIN_STYLE: np.zeros(run.config.model.latent_dim, dtype=np.float32)}
    if wanted - {MAIN_STYLE}:
        latents |= {named.name: named.latent for named in cluster_latents(run)}
    unknown = sorted(wanted - latents.keys())
    if unknown:
        raise DataError(review, f"style {unknown[0]} is not one of the run's styles ({', '.join(latents)})")
    return {style: latent_probabilities(run, latents[style]) for style in wanted}


def write_cases(
    run: Run,
    dataset: Dataset,
    selection: LabelSelection,
    decisions: dict[str, Decision],
    styles: dict[str, Probabilities],
    folder: Path,
    copy: bool,
    progress: bool,
) -> list[Curated]:
    in_run = set(run.case_ids)
    curated = []
    for case in tqdm(dataset.cases, desc="curating", unit="case", disable=not progress):
        decision = decisions.get(case.case_id)
        if case.case_id not in in_run:
            curated.append(Curated(case.case_id, NOT_IN_RUN, "", "left out", 0, str(case.label)))
        elif decision is not None and decision.decision == EXCLUDE:
            curated.append(Curated(case.case_id, EXCLUDE, "", "left out", 0, str(case.label)))
        else:
            curated.append(write_case(run, dataset, selection, case, decision, styles, folder, copy))
    return curated


def write_case(
    run: Run, dataset: Dataset, selection: LabelSelection, case: Case, decision: Decision | None, styles: dict[str, Probabilities], folder: Path, copy: bool
) -> Curated:
    """The case's image (linked or copied) and its label (copied, or replaced by the style's prediction)."""
    image_name = output_file_name(case.case_id, f"{NNUNET_CHANNEL_SUFFIX}{ENDING}")  # a name the file system takes
    stem = image_name.removesuffix(f"{NNUNET_CHANNEL_SUFFIX}{ENDING}")
    place_file(case.image, folder / "imagesTr" / image_name, link=not copy)
    label_file = folder / "labelsTr" / f"{stem}{ENDING}"
    name = decision.decision if decision is not None else UNDECIDED
    if decision is None or decision.decision != USE_PREDICTION:
        place_file(case.label, label_file, link=False)
        return Curated(case.case_id, name, "", "given", 0, str(case.label))
    volume = read_case(case, selection, dataset.declared_values)
    prediction = segment(volume.image, volume.affine, styles[decision.style], run.config.preprocess)
    label_nifti = open_nifti(case.label, "label file is missing")
    given = integer_labels(read_voxels(label_nifti, case.label))
    replaced = replacement_label(given, prediction, selection, dataset, case.label)
    save_label(replaced, label_nifti, label_file)
    changed = int(np.count_nonzero(replaced != given))
    return Curated(case.case_id, name, decision.style, "prediction", changed, str(case.label))


def integer_labels(label: np.ndarray) -> np.ndarray:
    """A label map (checked to hold integers when the case was read) in the smallest integer type that holds it."""
    values = np.rint(label).astype(np.int64)
    return values.astype(np.min_scalar_type(int(values.max(initial=0))))


def replacement_label(given: np.ndarray, prediction: np.ndarray, selection: LabelSelection, dataset: Dataset, path: Path) -> np.ndarray:
    """The given label with the run's classes replaced by the prediction's, in the dataset's label values."""
    values = class_values(given, selection, dataset, path)
    replaced = np.where(np.isin(given, values[1:]), 0, given)
    foreground = prediction > 0
    replaced[foreground] = values[prediction[foreground]]
    return replaced.astype(np.min_scalar_type(int(max(replaced.max(initial=0), values.max()))))


def class_values(given: np.ndarray, selection: LabelSelection, dataset: Dataset, path: Path) -> np.ndarray:
    """Class k -> label value. A run that learned all foreground as one class can say which value a voxel
    takes only where the label (or the dataset) has one foreground value."""
    if not selection.is_binary:
        return label_values(selection).astype(np.int64)
    present = np.unique(given[given != 0])
    declared = sorted(dataset.label_names.values())
    if len(present) > 1 or len(declared) > 1:
        found = ", ".join(str(value) for value in (present if len(present) > 1 else declared))
        raise DataError(
            path,
            f"holds label values {found}, but the run learned all foreground as one class, so its prediction "
            "cannot say which value a voxel takes: train with --label to replace such labels",
        )
    value = int(present[0]) if len(present) else (declared[0] if declared else 1)
    return np.array([0, value], dtype=np.int64)


def place_file(source: Path, destination: Path, link: bool) -> None:
    """A symbolic link to the source (absolute), or an atomic copy; a .nii source is gzipped on the way."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    compress = not source.name.endswith(ENDING)
    if link and not compress:
        os.symlink(source.resolve(), destination)
        return
    with open(source, "rb") as reader, atomic_open(destination, "wb") as writer:
        if compress:
            with gzip.GzipFile(fileobj=writer, mode="wb", compresslevel=1, mtime=0) as packed:
                shutil.copyfileobj(reader, packed)
        else:
            shutil.copyfileobj(reader, writer)


def write_dataset_json(dataset: Dataset, folder: Path, cases: int) -> None:
    """nnU-Net v2's dataset.json: the source's own (an nnU-Net dataset) with numTraining updated, or one
    built from what the source declares (a Decathlon dataset) or from the label values written."""
    meta = dict(load_json(dataset.root / "dataset.json")) if dataset.layout in ("nnunet", "msd") else {}
    channels = meta.pop("modality", None) or meta.get("channel_names") or DEFAULT_CHANNEL
    meta.pop("training", None), meta.pop("test", None)
    labels = {"background": 0, **dataset.label_names} if dataset.label_names else written_label_names(folder)
    meta |= {"channel_names": channels, "labels": labels, "numTraining": cases, "file_ending": ENDING, "curated_from": str(dataset.root)}
    atomic_write_text(folder / "dataset.json", json.dumps(meta, indent=2) + "\n")


def written_label_names(folder: Path) -> dict[str, int]:
    """Names for the label values the written labels hold (the source declared none)."""
    values: set[int] = set()
    for path in sorted((folder / "labelsTr").glob(f"*{ENDING}")):
        values |= {int(value) for value in np.unique(read_voxels(open_nifti(path, "label file is missing"), path))}
    return {"background": 0, **{f"label_{value}": value for value in sorted(values - {0})}}


def write_curation_csv(path: Path, cases: list[Curated]) -> None:
    rows = [[case.case, case.decision, case.style, case.label_source, case.voxels_changed, case.source_label] for case in cases]
    atomic_write_csv(path, [CURATION_COLUMNS, *rows])


def remove_abandoned_folders(out: Path) -> None:
    """The hidden folders beside `out` of curate runs that a kill ended (their process is gone)."""
    for marker in (BUILDING, PREVIOUS):
        for folder in out.parent.glob(f".{glob.escape(out.name)}{marker}*"):
            pid = folder.name.rpartition("-")[2]
            if pid.isdigit() and not process_exists(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def move_into_place(building: Path, out: Path) -> None:
    """Rename the finished dataset to `out`; a previous one (checked by check_destination) is removed after."""
    previous = out.parent / f".{out.name}{PREVIOUS}{os.getpid()}"
    if out.exists():
        os.replace(out, previous)
    os.replace(building, out)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(previous)
