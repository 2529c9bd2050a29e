"""Prepared cases on disk: each case is preprocessed once per setting and then memory-mapped.

cache_dir/<hash of the settings>/ holds, per case, `{case_id}.{hash of its input files}` .npy
arrays and a .json record written last, so an interrupted run resumes where it stopped and a
changed input file (path, size or mtime) is prepared again on its own.  The entries are keyed by
the input files themselves, so one cache folder serves every run and every dataset: a second run
with the same settings reads no volume again.  Bad cases are recorded too, so that a later run
reports them without reading their volumes again.  `hsort check` keeps each case's findings beside them,
in cache_dir/check-<hash of the label selection>/, keyed by the same file stamps (check.py), so that `fit` checks
and prepares a case in one read and a second check reads nothing.  Every file is written under a temporary name
and renamed, so processes filling one cache at the same time never see each other's partial files.
"""

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hypersort_core.atomic import atomic_open, atomic_write_text
from hypersort_core.faults import warn

from .errors import DataError
from .labels import LabelSelection
from .layouts import Case, Dataset
from .preprocess import PreprocessConfig, check_resampled_size, preprocess
from .volumes import LabelledVolume, case_files, read_case

CACHE_FORMAT = 1  # bump when a change to preprocessing makes existing caches wrong
CACHE_ENV = "HSORT_CACHE"
ABANDONED_AFTER_SECONDS = 3600  # a temporary file this old belongs to a write that a kill cut short
MAX_NAME_BYTES = 255  # the longest file name of common file systems (ext4, XFS, NTFS, APFS)
MAX_ID_BYTES_IN_NAMES = 100  # longer case ids are shortened (with a hash) in file names: names stay under 255 bytes
READ_WHOLE_BELOW_BYTES = 64 * 2**20  # smaller .npy files are read, not memory-mapped: truncation underneath cannot SIGBUS


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
        return load_array(self.image_file)

    def load_label(self) -> np.ndarray:
        return load_array(self.label_file)

    def load_foreground(self) -> np.ndarray:
        return load_array(self.foreground_file)

    def files(self) -> list[Path]:
        return [path for path in (self.image_file, self.label_file, self.foreground_file) if path is not None]


class DamagedArray(DataError, ValueError):
    """A cached .npy file that is truncated, overwritten or not an array (the problem says which, in one line).
    A DataError, so that a command meeting one reports it in one line; a ValueError, as numpy's own are."""


def array_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int, bool]:
    """Shape, dtype, data offset and Fortran order of a .npy file, after checking that the file holds all the data its header
    promises; a DamagedArray otherwise (an OSError for a missing or unreadable file)."""
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(handle)
        except (ValueError, EOFError, SyntaxError, UnicodeDecodeError) as error:
            raise DamagedArray(path, f"not a .npy array ({' '.join(str(error).split())[:120]})") from None
        offset = handle.tell()
    if dtype.hasobject:
        raise DamagedArray(path, "holds Python objects, not a prepared array")
    expected = offset + math.prod(shape) * dtype.itemsize
    size = os.stat(path).st_size
    if size < expected:
        raise DamagedArray(path, f"truncated: {size} bytes where its header promises {expected}")
    return shape, dtype, offset, fortran


def check_array(path: Path) -> str | None:
    """Why a cached array cannot be loaded, or None when it can."""
    try:
        array_header(path)
    except DamagedArray as error:
        return error.problem
    except OSError as error:
        return error.strerror or str(error)
    return None


def load_array(path: Path) -> np.ndarray:
    """A cached .npy array, checked against its header first; large ones memory-mapped, small ones read."""
    shape, dtype, offset, fortran = array_header(path)
    if math.prod(shape) * dtype.itemsize < READ_WHOLE_BELOW_BYTES:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = np.fromfile(handle, dtype=dtype, count=math.prod(shape))
        if data.size != math.prod(shape):  # truncated between the check and the read
            raise DamagedArray(path, f"truncated while it was read ({data.size} of {math.prod(shape)} values)")
        return data.reshape(shape, order="F" if fortran else "C")
    return np.load(path, mmap_mode="r")


@dataclass
class PreparedData:
    """The prepared cases of a dataset, and the cases that were skipped as bad."""

    cases: list[PreparedCase]
    bad: list[DataError]  # only with skip_bad
    cache_dir: Path  # the folder of these settings: the cache_dir argument / <hash>
    config: PreprocessConfig
    sources: dict = field(default_factory=dict, repr=False, compare=False)  # case id -> (Case, declared values, selection)

    def prepare_again(self, index: int) -> str | None:
        """Prepare case `index` again from its source files (its cache entry was found damaged); None when
        that worked (cases[index] then is the new entry), else the problem."""
        case_id = self.cases[index].case_id
        if case_id not in self.sources:
            return "its source files are not known here"
        case, declared_values, selection = self.sources[case_id]
        try:
            record_case(case, declared_values, selection, self.config, self.cache_dir)
            self.cases[index] = cached_case(case, selection, self.cache_dir)
        except DataError as error:
            return str(error)
        except OSError as error:
            return f"{error.filename or self.cache_dir}: {error.strerror or error}"
        return None


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
            prepared.append(sound_cached_case(case, dataset.declared_values, selection, config, folder))
        except DataError as error:
            if not skip_bad:
                raise
            bad.append(error)
    if not prepared:
        raise DataError(dataset.root, f"no usable case left: all {len(bad)} cases are bad, e.g. {bad[0]}")
    sources = {case.case_id: (case, dataset.declared_values, selection) for case in dataset.cases}
    return PreparedData(prepared, bad, folder, config, sources)


def sound_cached_case(case: Case, declared_values, selection: LabelSelection, config: PreprocessConfig, folder: Path) -> PreparedCase:
    """The cache entry of a case, prepared again from its source files (with a warning naming the case) when
    one of its files is missing, truncated or damaged, or its record unreadable."""
    try:
        entry = cached_case(case, selection, folder)
        problem = next((f"{path.name} {problem}" for path in entry.files() if (problem := check_array(path))), None)
    except (OSError, ValueError, KeyError, TypeError) as error:  # a damaged or foreign .json record
        problem = f"its record is unreadable ({type(error).__name__})"
    if problem is None:
        return entry
    warn(f"case {case.case_id}: its prepared cache entry is damaged ({problem}); preparing it again from its source files")
    record_case(case, declared_values, selection, config, folder)
    return cached_case(case, selection, folder)


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
    folder = prepared_folder(cache_dir, dataset, selection, config)
    missing = [case for case in (dataset.cases if cases is None else cases) if not record_path(case, selection, folder).is_file()]
    jobs = [(case, dataset.declared_values, selection, config, folder) for case in missing]
    run_in_processes(record_case, jobs, workers, "preparing cases", progress)
    return folder


def prepared_folder(cache_dir: Path, dataset: Dataset, selection: LabelSelection, config: PreprocessConfig) -> Path:
    """The folder of the prepared cases of these settings."""
    return cache_folder(cache_dir, settings_hash(dataset, selection, config))


def cache_folder(cache_dir: Path, name: str) -> Path:
    """cache_dir/name, made if need be, less the partial writes a kill abandoned there."""
    folder = Path(cache_dir) / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(cache_dir, f"cannot hold the prepared cases ({error.strerror or error}); choose another --cache or $HSORT_CACHE") from error
    remove_abandoned_writes(folder)
    return folder


def run_in_processes(function: Callable, jobs: Sequence[tuple], workers: int, what: str, progress: bool = True) -> list:
    """[function(*job) for job in jobs], in `workers` processes (0: in this one), with a progress bar saying `what`."""
    bar = tqdm(total=len(jobs), desc=what, unit="case", disable=not progress or not jobs)
    if workers == 0 or len(jobs) < 2:
        results = []
        for job in jobs:
            results.append(function(*job))
            bar.update()
        bar.close()
        return results
    # forkserver: a fresh, single-threaded parent for the workers, never a fork of this (threaded) process.
    pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("forkserver"))
    try:
        futures = [pool.submit(function, *job) for job in jobs]
        for done in as_completed(futures):
            done.result()
            bar.update()
        return [future.result() for future in futures]
    except BaseException:  # Ctrl-C, SIGTERM (faults.Terminated), a failed job: no worker may outlive this process
        stop_pool(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """End a pool's workers now (their unfinished entries are written under temporary names, never
    half-visible); the forkserver and the resource tracker end with this process."""
    pool.shutdown(wait=False, cancel_futures=True)
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            process.terminate()
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            process.join(timeout=5)


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
    return folder / f"{safe_file_stem(case.case_id)}.{digest(inputs)}.json"


def output_file_name(case_id: str, ending: str = ".nii.gz") -> str:
    """The file a case's output is written to: `{case_id}{ending}`, unless that name would be hidden
    (`.`, `..`, a leading dot), hold a path separator or be too long for a file system (255 bytes); then
    the shortened, hashed name of safe_file_stem."""
    name = f"{case_id}{ending}"
    if output_name_problem(case_id, ending) is None:
        return name
    return f"{safe_file_stem(case_id)}{ending}"


def output_name_problem(case_id: str, ending: str = ".nii.gz") -> str | None:
    """Why `{case_id}{ending}` cannot name an output file as it is (None when it can)."""
    name = f"{case_id}{ending}"
    if not case_id or case_id.startswith(".") or case_id in (".", ".."):
        return f"case id {case_id!r} would name a hidden output file ({name})"
    if "/" in case_id or "\\" in case_id or "\0" in case_id:
        return f"case id {case_id!r} holds a path separator"
    if len(name.encode()) > MAX_NAME_BYTES:
        return f"case id of {len(case_id.encode())} bytes is too long for an output file name ({MAX_NAME_BYTES} bytes with {ending})"
    return None


def safe_file_stem(case_id: str) -> str:
    """A case id as the start of a file name: kept when short and plain, else its plain characters cut
    short and a hash of the whole id (ids of 250 characters, `.`, `..`, or characters a file system refuses)."""
    plain = "".join(character if character.isalnum() or character in "-_" else "_" for character in case_id)
    if plain == case_id and len(case_id.encode()) <= MAX_ID_BYTES_IN_NAMES and not case_id.startswith("-"):
        return case_id
    return f"{plain[: MAX_ID_BYTES_IN_NAMES // 2]}~{hashlib.sha256(case_id.encode()).hexdigest()[:12]}"


def record_case(case: Case, declared_values, selection: LabelSelection, config: PreprocessConfig, folder: Path, volume: LabelledVolume | None = None) -> None:
    """Prepare one case into the cache and write its record last (a finished entry, or its problem).
    `volume`: the case already read and checked (`hsort fit` checks and prepares each case in one read)."""
    record_file = record_path(case, selection, folder)
    try:
        volume = read_case(case, selection, declared_values) if volume is None else volume
        check_resampled_size(volume, config, case.image)
    except DataError as error:
        record = {"path": str(error.path), "problem": error.problem}
    else:
        record = prepared_record(case, volume, config, folder, record_file.name.removesuffix(".json"))
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


def prepared_record(case: Case, volume: LabelledVolume, config: PreprocessConfig, folder: Path, prefix: str) -> dict:
    """Preprocess a sound volume into the cache's arrays; returns its record."""
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
    return digest(
        {
            "format": CACHE_FORMAT,
            "config": config.to_dict(),
            "selection": asdict(selection),
            "declared_values": sorted(declared) if declared is not None else None,
        }
    )


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
