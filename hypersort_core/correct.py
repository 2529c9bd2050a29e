"""`hsort correct`: pseudo-labels for training cases in one annotation style (the paper's corrective use).

Each chosen case's original image is segmented, exactly as `hsort predict` segments a new image,
by the UNet of a cluster's centroid, and written in the case's own geometry with the dataset's
label values, so that it can stand in for the given label. `changes.csv` says how far each
pseudo-label moved from the given one.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from hypersort_core.atomic import atomic_write_csv
from hypersort_core.config import ConfigError
from hypersort_core.data import (
    Case,
    DataError,
    LabelSelection,
    read_dataset,
    select_labels,
)
from hypersort_core.data.cache import output_file_name
from hypersort_core.data.volumes import open_nifti, read_case
from hypersort_core.metrics import foreground_dice
from hypersort_core.predict import latent_probabilities, save_label, segment
from hypersort_core.run import Run
from hypersort_core.run_folder import RANKING_NAME
from hypersort_core.styles import cluster_latent, cluster_name

CHANGES_NAME = "changes.csv"


@dataclass
class LabelChange:
    """How a pseudo-label differs from the given label of its case (foreground voxels, original grid)."""

    case: str
    voxels_added: int
    voxels_removed: int
    dice_to_given_label: float


def corrected_folder(run: Run, cluster: int) -> Path:
    return run.run_dir / f"corrected_{cluster_name(cluster)}"


def flagged_cases(run: Run, count: int) -> list[str]:
    """The `count` most suspicious cases of the run's ranking.csv (written by `hsort analyze`, most suspicious first)."""
    path = run.run_dir / RANKING_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run hsort analyze first")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "case" not in rows[0]:
        raise DataError(path, "needs a 'case' column with one row per case")
    return [row["case"] for row in rows[:count]]


def chosen_cases(run: Run, cases: list[str] | None = None, flagged: int | None = None) -> list[str]:
    """The cases named, the `flagged` most suspicious, or every training case."""
    if cases and flagged is not None:
        raise ConfigError("give --cases or --flagged, not both")
    if flagged is not None:
        return flagged_cases(run, flagged)
    if not cases:
        return list(run.case_ids)
    unknown = [case for case in cases if case not in run.case_ids]
    if unknown:
        raise ConfigError(f"not training cases of {run.run_dir}: {', '.join(unknown)}")
    return list(cases)


def label_values(selection: LabelSelection) -> np.ndarray:
    """Class k -> the dataset's value for it (1 for the binary selection): a lookup table."""
    values = [0, *(selection.values or [1])]
    return np.array(values, dtype=np.min_scalar_type(max(values)))


def label_change(case: str, prediction: np.ndarray, given: np.ndarray, num_classes: int) -> LabelChange:
    predicted, labelled = prediction > 0, given > 0
    return LabelChange(
        case,
        voxels_added=int(np.count_nonzero(predicted & ~labelled)),
        voxels_removed=int(np.count_nonzero(labelled & ~predicted)),
        dice_to_given_label=foreground_dice(prediction, given, num_classes),
    )


def write_changes_csv(path: Path, changes: list[LabelChange]) -> None:
    rows = [[change.case, change.voxels_added, change.voxels_removed, f"{change.dice_to_given_label:.4f}"] for change in changes]
    atomic_write_csv(path, [["case", "voxels_added", "voxels_removed", "dice_to_given_label"], *rows])


def correct_labels(run: Run, cluster: int, cases: list[str], out_dir: Path | None = None, progress: bool = True) -> tuple[Path, list[LabelChange]]:
    """Write {case}.nii.gz pseudo-labels of a cluster's style and changes.csv into out_dir; returns both."""
    out_dir = Path(out_dir) if out_dir is not None else corrected_folder(run, cluster)
    probabilities = latent_probabilities(run, cluster_latent(run, cluster).latent)
    dataset = read_dataset(run.data, run.config.layout, split=run.config.split)
    selection = select_labels(dataset, run.config.label)
    by_id: dict[str, Case] = {case.case_id: case for case in dataset.cases}
    missing = [case for case in cases if case not in by_id]
    if missing:
        raise DataError(dataset.root, f"no longer holds the run's cases {', '.join(missing)}")
    values = label_values(selection)
    changes = []
    for case_id in tqdm(cases, desc=f"correcting in cluster {cluster}'s style", unit="case", disable=not progress):
        case = by_id[case_id]
        volume = read_case(case, selection, dataset.declared_values)
        prediction = segment(volume.image, volume.affine, probabilities, run.config.preprocess)
        save_label(values[prediction], open_nifti(case.image, "image file is missing"), out_dir / output_file_name(case_id))
        changes.append(label_change(case_id, prediction, volume.label, selection.num_classes))
    changes_csv = out_dir / CHANGES_NAME
    write_changes_csv(changes_csv, changes)
    return changes_csv, changes
