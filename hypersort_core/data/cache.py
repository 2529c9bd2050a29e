"""Prepared cases on disk: each case is preprocessed once per setting and then memory-mapped.

cache_dir/<hash of the settings>/ holds, per case, `{case_id}.{hash of its input files}` .npy
arrays and a .json record written last, so an interrupted run resumes where it stopped and a
changed input file (path, size or mtime) is prepared again on its own.  The entries are keyed by
the input files themselves, so one cache folder serves every run and every dataset: a second run
with the same settings reads no volume again.  Bad cases are recorded too, so that a later run
reports them without reading their volumes again.  Every file is written under a temporary name
and renamed, so processes filling one cache at the same time never see each other's partial files.
"""

import contextlib
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hypersort_core.atomic import atomic_open, atomic_write_text

from .errors import DataError
from .labels import LabelSelection
from .layouts import Case, Dataset
from .preprocess import PreprocessConfig, check_resampled_size, preprocess
from .volumes import case_files, read_case

CACHE_FORMAT = 1  # bump when a change to preprocessing makes existing caches wrong
CACHE_ENV = "HSORT_CACHE"
ABANDONED_AFTER_SECONDS = 3600  # a temporary file this old belongs to a write that a kill cut short


def default_cache_dir() -> Path:
    """$HSORT_CACHE, else the user's cache folder ($XDG_CACHE_HOME or ~/.cache) / hypersort."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hypersort"


@dataclass
class PreparedCase:
    """A preprocessed case and the geometry that maps it back onto its source image."""

    case_id: str
    image_file: Path  # float32 [X, Y, Z]
    label_file: Path  # uint8 classes [X, Y, Z]
    affine: np.ndarray  # voxel -> world (RAS mm) of the cached grid
    original_shape: tuple[int, int, int]
    original_affine: np.ndarray  # voxel -> world of the source image
    foreground_file: Path | None = None  # flat indices of the foreground voxels, for random crops

    def load_image(self) -> np.ndarray:
        return np.load(self.image_file, mmap_mode="r")

    def load_label(self) -> np.ndarray:
        return np.load(self.label_file, mmap_mode="r")


@dataclass
class PreparedData:
    """The prepared cases of a dataset, and the cases that were skipped as bad."""

    cases: list[PreparedCase]
    bad: list[DataError]  # only with skip_bad
    cache_dir: Path  # the folder of these settings: the cache_dir argument / <hash>
    config: PreprocessConfig


def prepare_cases(
    dataset: Dataset,
    selection: LabelSelection,
    config: PreprocessConfig,
    cache_dir: Path,
    skip_bad: bool = False,
    progress: bool = True,
    workers: int = 0,
) -> PreparedData:
    """Preprocess every case, or reuse the cached result; bad cases raise, or are skipped with skip_bad."""
    folder = fill_cache(dataset, selection, config, cache_dir, workers=workers, progress=progress)
    prepared, bad = [], []
    for case in dataset.cases:
        try:
            prepared.append(cached_case(case, selection, folder))
        except DataError as error:
            if not skip_bad:
                raise
            bad.append(error)
    if not prepared:
        raise DataError(dataset.root, f"no usable case left: all {len(bad)} cases are bad, e.g. {bad[0]}")
    return PreparedData(prepared, bad, folder, config)


def fill_cache(
    dataset: Dataset,
    selection: LabelSelection,
    config: PreprocessConfig,
    cache_dir: Path,
    cases: Sequence[Case] | None = None,
    workers: int = 0,
    progress: bool = True,
) -> Path:
    """Preprocess the cases (default: all) that the cache lacks, in `workers` processes; returns the settings' folder.

    A bad case is recorded, not raised: reading the records reports it.
    """
    folder = Path(cache_dir) / settings_hash(dataset, selection, config)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(cache_dir, f"cannot hold the prepared cases ({error.strerror or error}); choose another --cache or $HSORT_CACHE") from error
    remove_abandoned_writes(folder)
    missing = [case for case in (dataset.cases if cases is None else cases) if not record_path(case, selection, folder).is_file()]
    jobs = [(case, dataset.declared_values, selection, config, folder) for case in missing]
    bar = tqdm(total=len(jobs), desc="preparing cases", unit="case", disable=not progress or not jobs)
    if workers == 0 or len(jobs) < 2:
        for job in jobs:
            record_case(*job)
            bar.update()
    else:
        # forkserver: a fresh, single-threaded parent for the workers, never a fork of this (threaded) process.
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("forkserver")) as pool:
            for done in as_completed([pool.submit(record_case, *job) for job in jobs]):
                done.result()
                bar.update()
    bar.close()
    return folder


def remove_abandoned_writes(folder: Path) -> None:
    """Delete the temporary files of writes that a kill cut short.  Only old ones: a younger one may be
    another process's write in progress (runs on several machines share a cache)."""
    cutoff = time.time() - ABANDONED_AFTER_SECONDS
    for temporary in folder.glob(".*.tmp"):
        with contextlib.suppress(OSError):  # another process may remove it first
            if temporary.stat().st_mtime < cutoff:
                temporary.unlink()


def record_path(case: Case, selection: LabelSelection, folder: Path) -> Path:
    """The .json record of a case's cache entry; the name changes when an input file does."""
    inputs = [file_stamp(file) for file in case_files(case, selection)]
    return folder / f"{case.case_id}.{digest(inputs)}.json"


def record_case(case: Case, declared_values, selection: LabelSelection, config: PreprocessConfig, folder: Path) -> None:
    """Prepare one case into the cache and write its record last (a finished entry, or its problem)."""
    record_file = record_path(case, selection, folder)
    record = prepare_case(case, declared_values, selection, config, folder, record_file.name.removesuffix(".json"))
    atomic_write_text(record_file, json.dumps(record))


def cached_case(case: Case, selection: LabelSelection, folder: Path) -> PreparedCase:
    """The cache entry of a case, from its record; a case recorded as bad raises its DataError."""
    record = json.loads(record_path(case, selection, folder).read_text())
    if "problem" in record:
        raise DataError(record["path"], record["problem"])
    return PreparedCase(
        case_id=record["case_id"],
        image_file=folder / record["image_file"],
        label_file=folder / record["label_file"],
        affine=np.array(record["affine"]),
        original_shape=tuple(record["original_shape"]),
        original_affine=np.array(record["original_affine"]),
        foreground_file=folder / record["foreground_file"] if record["foreground_file"] else None,
    )


def prepare_case(
    case: Case, declared_values, selection: LabelSelection, config: PreprocessConfig, folder: Path, prefix: str
) -> dict:
    """Read, check and preprocess one case into the cache; returns its record (or its problem)."""
    try:
        volume = read_case(case, selection, declared_values)
        check_resampled_size(volume, config, case.image)
    except DataError as error:
        return {"path": str(error.path), "problem": error.problem}
    result = preprocess(volume, config)
    files = {"image_file": f"{prefix}.image.npy", "label_file": f"{prefix}.label.npy", "foreground_file": None}
    save_array(folder / files["image_file"], result.image)
    save_array(folder / files["label_file"], result.label)
    if config.crop == "random":
        files["foreground_file"] = f"{prefix}.foreground.npy"
        save_array(folder / files["foreground_file"], np.flatnonzero(result.label))
    return {
        "case_id": case.case_id,
        **files,
        "affine": result.affine.tolist(),
        "original_shape": list(volume.image.shape),
        "original_affine": volume.affine.tolist(),
    }


def settings_hash(dataset: Dataset, selection: LabelSelection, config: PreprocessConfig) -> str:
    declared = dataset.declared_values
    return digest({
        "format": CACHE_FORMAT,
        "config": config.to_dict(),
        "selection": asdict(selection),
        "declared_values": sorted(declared) if declared is not None else None,
    })


def file_stamp(path: Path) -> list:
    """Path, size and modification time: a changed file gets a new cache entry without being read."""
    try:
        status = path.stat()
    except OSError:
        return [str(path), None, None]  # reading the case will report the problem
    return [str(path), status.st_size, status.st_mtime_ns]


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def save_array(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as file:
        np.save(file, array)
