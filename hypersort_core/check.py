"""`hsort check`: find what is wrong with a dataset before a day of training finds it.

Errors make a case unusable (a missing file, a label off the image's grid, NaN voxels, label values
dataset.json does not declare, a dataset.json that contradicts its folder). Warnings are cases a
curator should look at but that training can use: empty labels, an orientation unlike the others,
the same image under two ids, spacing or size far from the rest, labels drawn outside the body.

Each case's headers are read first and its voxels once; only small facts (spacing, shape,
orientation, a hash of the image) are kept, so the cross-case checks cost no second pass.  Those facts
and the case's own findings are cached, keyed by its files as prepared cases are (data/cache.py), so a
second check of unchanged files reads no volume; `fit` prepares each case in the same read that checks it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from hypersort_core.atomic import atomic_write_text
from hypersort_core.data import (
    Case,
    DataError,
    Dataset,
    LabelSelection,
    read_dataset,
    select_labels,
)
from hypersort_core.data.cache import (
    cache_folder,
    digest,
    output_file_name,
    output_name_problem,
    prepared_folder,
    record_case,
    record_path,
    run_in_processes,
)
from hypersort_core.data.layouts import load_json
from hypersort_core.data.preprocess import PreprocessConfig
from hypersort_core.data.volumes import (
    LabelledVolume,
    check_affine,
    check_label_values,
    distinct_values,
    label_files,
    open_aligned_label,
    open_nifti,
    read_voxels,
    spatial_shape,
    structure_classes,
    voxel_sizes,
)

# The dataset.json keys nnU-Net requires ("a|b": either); numTraining, where given, must match the cases found.
REQUIRED_KEYS = {
    "nnunet": ("labels", "channel_names|modality", "numTraining", "file_ending"),
    "msd": ("labels", "modality|channel_names", "training"),
}
OUTLIER_MADS = 3.0  # robust z-score (MAD scaled to a standard deviation) beyond which an axis is odd...
OUTLIER_MIN_FACTOR = 1.2  # ...provided it is also this factor away from the median (MAD may be 0)
OUTLIER_FACTOR = 2.0  # an axis this factor away from the median is odd whatever the spread
MIN_CASES_FOR_OUTLIERS = 3
MAD_TO_SD = 1.4826
CT_AIR_HU = -500.0  # images reaching this are taken as CT in Hounsfield units; air lies below it
NON_CT_AIR_FRACTION = 0.1  # otherwise air lies below p1 + 10% of the p1..p99 intensity range
OUTSIDE_BODY_FRACTION = 0.01  # warn when more than 1% of a case's foreground lies outside the body
BODY_MASK_SIDE = 128  # the body is found on the image subsampled to about this many voxels per side
CHECK_FORMAT = 1  # bump when a change to the checks makes cached findings wrong


@dataclass
class Issue:
    """One problem: which case (None for the dataset as a whole), which file, what is wrong."""

    severity: str  # "error" or "warning"
    case: str | None
    file: Path
    problem: str

    def to_dict(self) -> dict:
        return {"case": self.case, "file": str(self.file), "problem": self.problem}

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}"


@dataclass
class CaseFacts:
    """What one pass over a case leaves for the cross-case checks, and the case's own issues."""

    case: Case
    issues: list[Issue] = field(default_factory=list)
    spacing: np.ndarray | None = None
    shape: tuple[int, int, int] | None = None
    orientation: str | None = None
    digest: str | None = None

    def add(self, severity: str, file: Path, problem: str) -> None:
        self.issues.append(Issue(severity, self.case.case_id, file, problem))

    @property
    def has_errors(self) -> bool:
        return any(issue.severity == "error" for issue in self.issues)

    def to_record(self) -> dict:
        """What the findings cache keeps of a case: everything but the case itself."""
        return {
            "issues": [[issue.severity, str(issue.file), issue.problem] for issue in self.issues],
            "spacing": None if self.spacing is None else self.spacing.tolist(),
            "shape": None if self.shape is None else list(self.shape),
            "orientation": self.orientation,
            "digest": self.digest,
        }

    @classmethod
    def from_record(cls, case: Case, record: dict) -> CaseFacts:
        return cls(
            case,
            [Issue(severity, case.case_id, Path(file), problem) for severity, file, problem in record["issues"]],
            None if record["spacing"] is None else np.array(record["spacing"]),
            None if record["shape"] is None else tuple(record["shape"]),
            record["orientation"],
            record["digest"],
        )


@dataclass
class CaseStatus:
    case: str
    status: str  # "ok", "warning" or "error"
    problems: list[str]


@dataclass
class CheckReport:
    """The outcome of `check_dataset`: per-case status, and the errors and warnings apart."""

    root: Path
    layout: str
    cases: list[CaseStatus]
    errors: list[Issue]
    warnings: list[Issue]

    @property
    def exit_code(self) -> int:
        """0 clean, 1 warnings only, 2 errors."""
        return 2 if self.errors else 1 if self.warnings else 0

    def raise_on_errors(self) -> None:
        """Stop a caller (such as `fit`) at the first error, saying how many more there are."""
        if self.errors:
            first, more = self.errors[0], len(self.errors) - 1
            suffix = f" (and {more} more errors; `hsort check` lists them)" if more else ""
            raise DataError(first.file, first.problem + suffix)

    def to_dict(self) -> dict:
        counts = Counter(case.status for case in self.cases)
        return {
            "dataset": str(self.root),
            "layout": self.layout,
            "cases": [{"case": c.case, "status": c.status, "problems": c.problems} for c in self.cases],
            "errors": [issue.to_dict() for issue in self.errors],
            "warnings": [issue.to_dict() for issue in self.warnings],
            "summary": {
                "cases": len(self.cases),
                **{status: counts.get(status, 0) for status in ("ok", "warning", "error")},
                "errors": len(self.errors),
                "warnings": len(self.warnings),
                "exit_code": self.exit_code,
            },
        }


def check_dataset(
    root: Path | str,
    layout: str = "auto",
    label: str | None = None,
    progress: bool = False,
    split: str | None = None,
    cache_dir: Path | None = None,
    workers: int = 0,
    prepare: PreprocessConfig | None = None,
) -> CheckReport:
    """Check every case of the dataset at `root` (of a TotalSegmentator `split`); a folder that is no dataset raises DataError.

    With a `cache_dir` each case's findings are cached there, and cases whose files did not change since
    are not read again; with `prepare` (`fit`'s preprocessing settings) each case is also prepared into the
    cache in the read that checks it.
    `workers` processes check the cases (0: this process)."""
    dataset = read_dataset(root, layout, split)
    selection = select_labels(dataset, label)
    dataset_issues = dataset_json_issues(dataset)
    facts = all_case_facts(dataset, selection, cache_dir, workers, progress, prepare)
    cross_case_warnings(facts)
    for fact in facts:  # ids that cannot name an output file as they are (correct's pseudo-labels, predict's labels)
        if (problem := output_name_problem(fact.case.case_id)) is not None:
            fact.add("warning", fact.case.image, f"{problem}; its outputs are written as {output_file_name(fact.case.case_id)}")
    issues = dataset_issues + [issue for fact in facts for issue in fact.issues]
    return CheckReport(
        root=dataset.root,
        layout=dataset.layout,
        cases=[case_status(fact) for fact in facts],
        errors=[issue for issue in issues if issue.severity == "error"],
        warnings=[issue for issue in issues if issue.severity == "warning"],
    )


def all_case_facts(
    dataset: Dataset, selection: LabelSelection, cache_dir: Path | None, workers: int, progress: bool, prepare: PreprocessConfig | None
) -> list[CaseFacts]:
    """Each case's facts: from the findings cache where its files are unchanged (and, with `prepare`,
    its prepared entry is there too), else from one read of its files, in `workers` processes."""
    findings = None if cache_dir is None else findings_folder(cache_dir, dataset, selection)
    prepared = None if prepare is None or cache_dir is None else prepared_folder(cache_dir, dataset, selection, prepare)
    facts = [cached_facts(case, selection, findings, prepared) for case in dataset.cases]
    unread = [index for index, fact in enumerate(facts) if fact is None]
    jobs = [(dataset.cases[index], selection, dataset.declared_values, findings, prepare, prepared) for index in unread]
    for index, fact in zip(unread, run_in_processes(check_and_prepare, jobs, workers, "checking and preparing" if prepared else "checking", progress)):
        facts[index] = fact
    return facts


def findings_folder(cache_dir: Path, dataset: Dataset, selection: LabelSelection) -> Path:
    """Where the findings of the cases of this label selection are cached, beside the prepared cases."""
    declared = dataset.declared_values
    key = {"format": CHECK_FORMAT, "selection": asdict(selection), "declared_values": sorted(declared) if declared is not None else None}
    return cache_folder(cache_dir, f"check-{digest(key)}")


def cached_facts(case: Case, selection: LabelSelection, findings: Path | None, prepared: Path | None) -> CaseFacts | None:
    """A case's cached facts, or None when its files must be read (a changed file, an unreadable record,
    or a case that still needs preparing)."""
    if findings is None:
        return None
    try:
        fact = CaseFacts.from_record(case, json.loads(record_path(case, selection, findings).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    needs_preparing = prepared is not None and not fact.has_errors and not record_path(case, selection, prepared).is_file()
    return None if needs_preparing else fact


def check_and_prepare(
    case: Case,
    selection: LabelSelection,
    declared_values: set[int] | None,
    findings: Path | None,
    prepare: PreprocessConfig | None,
    prepared: Path | None,
) -> CaseFacts:
    """One read of a case: its findings, cached when `findings` is a folder, and a sound case prepared into `prepared`."""
    fact, volume = check_case(case, selection, declared_values)
    if prepared is not None and volume is not None:
        record_case(case, declared_values, selection, prepare, prepared, volume)
    if findings is not None:
        atomic_write_text(record_path(case, selection, findings), json.dumps(fact.to_record()))
    return fact


def case_status(fact: CaseFacts) -> CaseStatus:
    severities = {issue.severity for issue in fact.issues}
    status = "error" if "error" in severities else "warning" if severities else "ok"
    return CaseStatus(fact.case.case_id, status, [issue.problem for issue in fact.issues])


def dataset_json_issues(dataset: Dataset) -> list[Issue]:
    """nnU-Net's dataset.json checks: the required keys, and numTraining against the cases found."""
    if dataset.layout not in REQUIRED_KEYS:
        return []
    meta_file = dataset.labels_file
    meta = load_json(meta_file)
    issues = [
        Issue("error", None, meta_file, f"required key {' or '.join(repr(k) for k in key.split('|'))} is missing")
        for key in REQUIRED_KEYS[dataset.layout]
        if not any(alternative in meta for alternative in key.split("|"))
    ]
    declared = meta.get("numTraining")
    if declared is not None and declared != len(dataset.cases):
        problem = f"numTraining is {declared!r} but {len(dataset.cases)} training cases were found"
        issues.append(Issue("error", None, meta_file, problem))
    return issues


def check_case(case: Case, selection: LabelSelection, declared_values: set[int] | None) -> tuple[CaseFacts, LabelledVolume | None]:
    """Headers first (files present, labels on the image's grid), then the voxels, each file once.
    Returns the facts, and the volume as `read_case` reads it when the case has no error."""
    import nibabel as nib

    fact = CaseFacts(case)
    try:
        image_nifti = open_nifti(case.image, "image file is missing")
        shape = spatial_shape(image_nifti, case.image)
    except DataError as error:
        fact.add("error", error.path, error.problem)
        return fact, None
    try:
        check_affine(image_nifti.affine, shape, case.image)
    except DataError as error:
        fact.add("error", error.path, error.problem)
        return fact, None
    fact.shape, fact.spacing = shape, voxel_sizes(image_nifti.affine)
    fact.orientation = "".join(code or "?" for code in nib.aff2axcodes(image_nifti.affine))  # ? = degenerate axis
    aligned_labels, expected_labels = {}, label_files(case, selection)
    for path in expected_labels:
        try:
            aligned_labels[path] = open_aligned_label(path, shape, image_nifti.affine, case.image)
        except DataError as error:
            fact.add("error", error.path, error.problem)
    try:
        image = read_voxels(image_nifti, case.image, np.float32)
    except DataError as error:
        fact.add("error", error.path, error.problem)
        return fact, None
    fact.digest = voxel_digest(image)
    finite = check_finite(image, fact)
    if len(aligned_labels) != len(expected_labels):
        return fact, None
    classes = check_label_content(fact, image if finite else None, aligned_labels, selection, declared_values)
    if fact.has_errors or classes is None:
        return fact, None
    return fact, LabelledVolume(image, classes, image_nifti.affine)


def voxel_digest(image: np.ndarray) -> str:
    """Same shape and same voxel values give the same digest, whatever the file or header.  The values
    are hashed in Fortran order, NIfTI's own, so that nibabel's volume is hashed in place, with SHA-1
    (duplicates are found among a curator's files, not against an adversary; SHA-1 is the fastest here)."""
    digest = hashlib.sha1(str(image.shape).encode(), usedforsecurity=False)
    digest.update(image.ravel(order="F").data)  # a view of a Fortran-ordered volume: no copy
    return digest.hexdigest()


def check_finite(image: np.ndarray, fact: CaseFacts) -> bool:
    """NaN makes the minimum NaN and infinities make an extreme infinite: two reductions, no mask of the volume."""
    if np.isfinite(image.min()) and np.isfinite(image.max()):
        return True
    non_finite = image.size - np.count_nonzero(np.isfinite(image))
    fact.add("error", fact.case.image, f"image holds {non_finite} NaN or infinite voxels")
    return False


def check_label_content(
    fact: CaseFacts,
    image: np.ndarray | None,
    labels: dict,
    selection: LabelSelection,
    declared_values: set[int] | None,
) -> np.ndarray | None:
    """Undeclared values are errors; empty selected labels and labels outside the body are warnings.
    Returns the case's classes (None where its label cannot be used)."""
    case = fact.case
    try:
        if isinstance(case.label, dict):
            classes = structure_classes(labels, selection, fact.shape)
        else:
            label_map = read_voxels(labels[case.label], case.label)
            check_label_values(label_map, declared_values, case.label)
            classes = selection.classes_of(label_map)
    except DataError as error:
        fact.add("error", error.path, error.problem)
        return None
    present = set(distinct_values(classes).tolist())
    report_empty_labels(fact, present, selection)
    if image is not None and present != {0}:
        report_labels_outside_body(fact, image, classes != 0)
    return classes


def report_empty_labels(fact: CaseFacts, present: set[int], selection: LabelSelection) -> None:
    """The binary selection warns when there is no foreground at all; a named selection per label."""
    if selection.is_binary:
        if present == {0}:
            fact.add("warning", label_folder(fact.case), "label is empty (no foreground voxels)")
        return
    for number, name in enumerate(selection.names, start=1):
        if number not in present:
            fact.add("warning", label_path(fact.case, name), f"label {name!r} is empty in this case")


def label_path(case: Case, name: str) -> Path:
    return case.label[name] if isinstance(case.label, dict) else case.label


def label_folder(case: Case) -> Path:
    """Where a case's labels are: its label file, or TotalSegmentator's segmentations folder."""
    return case.image.parent / "segmentations" if isinstance(case.label, dict) else case.label


def report_labels_outside_body(fact: CaseFacts, image: np.ndarray, foreground: np.ndarray) -> None:
    """The body is found on the image subsampled to about BODY_MASK_SIDE voxels per side (the warning is
    in percent of the label: it needs no finer body outline); the foreground is counted at full resolution."""
    strides = body_mask_strides(image.shape)
    coarse = image[tuple(slice(None, None, stride) for stride in strides)]
    threshold = air_threshold(image, coarse)
    outside_body = ~body_mask(coarse, threshold)
    total = np.count_nonzero(foreground)
    outside = count_in_blocks(foreground, outside_body, strides)
    if outside > OUTSIDE_BODY_FRACTION * total:
        problem = f"{outside} of {total} foreground voxels ({outside / total:.0%}) lie outside the body (image intensity below the air level {threshold:g})"
        fact.add("warning", label_folder(fact.case), problem)


def count_in_blocks(mask: np.ndarray, coarse: np.ndarray, strides: tuple[int, ...]) -> int:
    """Voxels of `mask` whose block of strides[0] × strides[1] × strides[2] voxels is set in `coarse`,
    one slab of blocks along the last axis (contiguous in a Fortran-ordered volume) at a time."""
    (first, second, third), count = strides, 0
    for block in range(coarse.shape[2]):
        plane = coarse[:, :, block].repeat(first, axis=0)[: mask.shape[0]].repeat(second, axis=1)[:, : mask.shape[1]]
        count += np.count_nonzero(mask[:, :, block * third : (block + 1) * third] & plane[:, :, None])
    return count


def body_mask_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Per axis, every how many voxels the body mask samples the image: 1 up to BODY_MASK_SIDE voxels."""
    return tuple(max(1, math.ceil(size / BODY_MASK_SIDE)) for size in shape)


def air_threshold(image: np.ndarray, sample: np.ndarray) -> float:
    """Air is below −500 HU in a CT (an image reaching −500 or below); in other images, below
    p1 + 10% of the p1..p99 intensity range (of a subsample of the voxels), which holds for MR
    background and its noise."""
    if image.min() <= CT_AIR_HU:
        return CT_AIR_HU
    low, high = np.percentile(sample, [1, 99])
    return float(low + NON_CT_AIR_FRACTION * (high - low))


def body_mask(image: np.ndarray, threshold: float) -> np.ndarray:
    """Everything but the air that reaches a slice's edge, in slices along each of the three axes:
    lungs, airways and bowel gas are enclosed within some slice, so they count as inside the body
    even where they reach the edge of the volume in 3-D (the trachea leaves through its top)."""
    air = image < threshold
    outside = air.copy()
    for axis in range(3):
        outside &= air_reaching_slice_edges(air, axis)
    return ~outside


def air_reaching_slice_edges(air: np.ndarray, axis: int) -> np.ndarray:
    """Air connected, within its slice across `axis`, to the slice's edge: one labelling pass."""
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[tuple(1 if a == axis else slice(None) for a in range(3))] = True
    components, count = ndimage.label(air, structure=in_plane)
    edge_faces = [np.take(components, end, axis=other).ravel() for other in range(3) if other != axis for end in (0, -1)]
    reaches_edge = np.zeros(count + 1, dtype=bool)
    reaches_edge[np.concatenate(edge_faces)] = True
    reaches_edge[0] = False  # not air
    return reaches_edge[components]


def cross_case_warnings(facts: list[CaseFacts]) -> None:
    """The checks that compare cases: orientation, duplicated images, spacing and size outliers."""
    readable = [fact for fact in facts if fact.shape is not None]
    warn_minority_orientation(readable)
    warn_duplicates([fact for fact in readable if fact.digest is not None])
    if len(readable) >= MIN_CASES_FOR_OUTLIERS:
        warn_outliers(readable, "spacing", np.array([fact.spacing for fact in readable]), "mm")
        warn_outliers(readable, "size", np.array([fact.shape for fact in readable], dtype=float), "voxels")


def warn_minority_orientation(facts: list[CaseFacts]) -> None:
    counts = Counter(fact.orientation for fact in facts)
    if len(counts) < 2:
        return
    usual, usual_count = counts.most_common(1)[0]
    for fact in facts:
        if fact.orientation != usual:
            problem = f"orientation {fact.orientation} differs from {usual} of {usual_count} of {len(facts)} cases"
            fact.add("warning", fact.case.image, problem)


def warn_duplicates(facts: list[CaseFacts]) -> None:
    groups = defaultdict(list)
    for fact in facts:
        groups[fact.digest].append(fact)
    for group in groups.values():
        for fact in group if len(group) > 1 else []:
            others = ", ".join(other.case.case_id for other in group if other is not fact)
            fact.add("warning", fact.case.image, f"image voxels are identical to those of {others}")


def warn_outliers(facts: list[CaseFacts], what: str, values: np.ndarray, unit: str) -> None:
    """Per axis: more than 3 scaled MADs and 20% from the median, or a factor 2 from it."""
    median = np.median(values, axis=0)
    spread = MAD_TO_SD * np.median(np.abs(values - median), axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):  # a degenerate affine has spacing 0
        factor = np.maximum(values / median, median / values)
    robust_z = np.abs(values - median) / np.where(spread > 0, spread, np.inf)
    odd = (factor > OUTLIER_FACTOR) | ((robust_z > OUTLIER_MADS) & (factor > OUTLIER_MIN_FACTOR))
    for fact, row, odd_axes in zip(facts, values, odd):
        if odd_axes.any():
            problem = f"{what} {format_axes(row)} {unit} is an outlier (median {format_axes(median)} {unit})"
            fact.add("warning", fact.case.image, problem)


def format_axes(values: np.ndarray) -> str:
    return "×".join(f"{value:.3g}" for value in values)


def format_report(report: CheckReport) -> str:
    """The per-case table, then the errors and the warnings, each naming case and file."""
    width = max([len("case"), *(len(case.case) for case in report.cases)])
    lines = [f"{'case':<{width}}  status   problems"]
    lines += [f"{case.case:<{width}}  {case.status:<7}  {'; '.join(case.problems) or '-'}" for case in report.cases]
    for title, issues in (("errors", report.errors), ("warnings", report.warnings)):
        if issues:
            lines += ["", f"{title} ({len(issues)}):"]
            lines += [f"  [{issue.case or 'dataset'}] {issue}" for issue in issues]
    summary = report.to_dict()["summary"]
    cases = f"{summary['cases']} cases: {summary['ok']} ok, {summary['warning']} with warnings, {summary['error']} with errors"
    lines += ["", f"{cases}; {summary['errors']} errors, {summary['warnings']} warnings"]
    return "\n".join(lines)
