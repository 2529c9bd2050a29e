"""A CPU-sized version of the paper's proof of concept: CT-like phantoms whose organ labels are
clean for most cases and wrong for a few (label_errors.py has the kinds of error), and optionally a
subset annotated under another protocol (a style), as if from annotators with other habits.

Each case's phantom comes from its own random stream, so the clean data of a seed does not depend
on how many cases, which kinds or how many perturbations are asked for.
"""

import csv
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import DataError
from .label_errors import ERROR_KINDS, STYLES, Anatomy

AIR_HU = -1000.0
SOFT_TISSUE_HU = 40.0
NOISE_HU = 12.0
VOXEL_MM = 2.0
MIN_SIZE = 16  # smaller phantoms cannot keep an organ through erosion
DEFAULT_KINDS = ("eroded", "dilated")
PERTURBATION_COLUMNS = ["case", "kind", "style", "severity", "parameters", "voxels_changed"]
MAIN_STYLE = "main"
PERTURBATIONS_NAME = "perturbations.csv"  # the ground truth of the labels made wrong


def make_synthetic_dataset(
    out: Path,
    cases: int = 60,
    size: int = 32,
    perturbed: float = 0.15,
    seed: int = 0,
    kinds: tuple[str, ...] = DEFAULT_KINDS,
    style: str | None = None,
    style_fraction: float = 0.0,
) -> Path:
    """Write an nnU-Net raw dataset of `cases` phantoms of size³ voxels, and perturbations.csv.

    A `perturbed` share of the cases gets a label error, the kinds taken in turn; a `style_fraction`
    of the others is annotated under the protocol `style` (label_errors.STYLES).  `out` must be new or
    empty, so that no case of an earlier dataset mixes with these.
    """
    check_settings(cases, size, perturbed, kinds, style, style_fraction)
    out = Path(out)
    import nibabel as nib  # imported here: see volumes.py

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(out, "already exists and is not an empty folder; choose a new one")
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    plan_stream, *case_streams = np.random.SeedSequence(seed).spawn(cases + 1)
    plan = perturbation_plan(cases, perturbed, np.random.default_rng(plan_stream), kinds, style_fraction)
    rows = []
    for index, ((kind, severity), stream) in enumerate(zip(plan, case_streams)):
        case_id = f"synth_{index:03d}"
        rng = np.random.default_rng(stream)
        # The error's and the vessel's draws come from child streams, so that the phantom never depends on
        # the error, and a vessel (drawn only for the style that needs one) changes nothing else.
        error_stream, vessel_stream = stream.spawn(2)
        image, anatomy = phantom(size, rng, np.random.default_rng(vessel_stream) if style == "vessel" else None)
        affine = lps_affine(rng)
        label, parameters = annotate(anatomy, kind, style, severity, np.random.default_rng(error_stream))
        nib.save(nib.Nifti1Image(image, affine), out / "imagesTr" / f"{case_id}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), out / "labelsTr" / f"{case_id}.nii.gz")
        case_style = style if kind == "style" else MAIN_STYLE
        case_kind = "clean" if kind == "style" else kind
        changed = int(np.count_nonzero(label != anatomy.organ))
        rows.append([case_id, case_kind, case_style, severity, json.dumps(parameters), changed])
    write_dataset_json(out, cases)
    with open(out / PERTURBATIONS_NAME, "w", newline="") as file:
        csv.writer(file).writerows([PERTURBATION_COLUMNS, *rows])
    return out


def check_settings(cases: int, size: int, perturbed: float, kinds: tuple[str, ...], style: str | None, style_fraction: float) -> None:
    if cases < 1:
        raise ValueError(f"cases must be at least 1, got {cases}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}, got {size}")
    if not 0 <= perturbed <= 1 or not 0 <= style_fraction <= 1 or perturbed + style_fraction > 1:
        raise ValueError(f"perturbed ({perturbed}) and style_fraction ({style_fraction}) must be fractions that add up to 1 at most")
    unknown = [kind for kind in kinds if kind not in ERROR_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown error kind(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ERROR_KINDS)}")
    if style_fraction > 0 and style not in STYLES:
        raise ValueError(f"a style subset needs a style, one of {', '.join(STYLES)}; got {style!r}")


def annotate(anatomy: Anatomy, kind: str, style: str | None, severity: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """The label a case's annotator drew: clean, with an error of `kind`, or in `style`."""
    if kind == "clean":
        return anatomy.organ, {}
    if kind == "style":
        return STYLES[style](anatomy), {"protocol": style}
    return ERROR_KINDS[kind](anatomy, severity, rng)


def perturbation_plan(
    cases: int, perturbed: float, rng: np.random.Generator, kinds: tuple[str, ...] = DEFAULT_KINDS, style_fraction: float = 0.0
) -> list[tuple[str, int]]:
    """(kind, severity 1-3) per case: a `perturbed` share with the kinds in turn, then a `style_fraction`
    of the rest as "style"; the others ("clean", 0) follow the main protocol."""
    plan = [("clean", 0)] * cases
    chosen = np.sort(rng.choice(cases, size=round(perturbed * cases), replace=False))
    for order, index in enumerate(chosen):
        plan[index] = (kinds[order % len(kinds)], int(rng.integers(1, 4)))
    if style_fraction > 0:
        unchosen = np.setdiff1d(np.arange(cases), chosen)
        for index in rng.choice(unchosen, size=min(len(unchosen), round(style_fraction * cases)), replace=False):
            plan[index] = ("style", 0)
    return plan


def phantom(size: int, rng: np.random.Generator, vessel_rng: np.random.Generator | None = None) -> tuple[np.ndarray, Anatomy]:
    """An int16 CT-like image and its anatomy: the organ mask, its neighbours, the body, a vessel.

    A soft-tissue body in air holds an irregular organ (an ellipsoid whose radius follows smooth
    noise) with a smooth intensity gradient, and one or two unlabelled neighbours of similar
    intensity that touch or nearly touch it.  Given `vessel_rng`, a contrast-filled vessel also runs
    head to foot in a groove of the organ's back, as the inferior vena cava runs along the liver; the
    organ excludes it.  It is drawn last from its own stream, so every other structure is the same
    with or without it.
    """
    grid = (np.indices((size,) * 3) + 0.5) / size - 0.5  # voxel centres, in fractions of the field of view
    body = inside_ellipsoid(grid, np.zeros(3), np.array([0.46, 0.44, 0.48]) * rng.uniform(0.97, 1.0, 3))
    organ_centre = rng.uniform(-0.04, 0.04, 3)
    organ_radii = rng.uniform(0.2, 0.3, 3)
    organ = inside_ellipsoid(grid, organ_centre, organ_radii, wobble=0.25 * smooth_noise(size, rng))
    organ_hu = rng.uniform(90, 130)
    image = np.where(body, SOFT_TISSUE_HU, AIR_HU)
    neighbours = []
    for _ in range(rng.integers(1, 3)):
        neighbours.append(neighbour_of(grid, organ_centre, organ_radii, rng) & body)
        image[neighbours[-1]] = organ_hu + rng.choice([-1, 1]) * rng.uniform(15, 35)
    gradient = rng.uniform(10, 25) * np.tensordot(unit_vector(rng), grid, axes=1)
    image[organ] = organ_hu + gradient[organ]
    image += rng.normal(0, NOISE_HU, image.shape)
    vessel = np.zeros_like(organ)
    if vessel_rng is not None:
        vessel = vessel_beside(grid, organ_centre, organ_radii, vessel_rng) & body
        image[vessel] = organ_hu + vessel_rng.uniform(70, 100) + vessel_rng.normal(0, NOISE_HU, int(vessel.sum()))
        organ = organ & ~vessel
    return np.round(image).astype(np.int16), Anatomy(organ, [n & ~organ & ~vessel for n in neighbours], body, vessel)


def neighbour_of(grid: np.ndarray, organ_centre: np.ndarray, organ_radii: np.ndarray, rng: np.random.Generator):
    """A ball beside the organ, its surface at most a few percent of the field of view away."""
    direction = unit_vector(rng)
    radius = rng.uniform(0.08, 0.13)
    organ_extent = 1 / np.linalg.norm(direction / organ_radii)  # organ's radius along `direction`
    centre = organ_centre + direction * (organ_extent + radius * rng.uniform(0.9, 1.3))
    return inside_ellipsoid(grid, centre, np.full(3, radius))


def vessel_beside(grid: np.ndarray, organ_centre: np.ndarray, organ_radii: np.ndarray, rng: np.random.Generator):
    """A tube along the superior axis, its axis just inside the organ's back (posterior, within 35° of
    straight back), so that it lies half in a groove of the organ."""
    angle = np.pi / 2 + rng.uniform(-0.6, 0.6)  # from the first axis; the second runs towards the back
    direction = np.array([np.cos(angle), np.sin(angle), 0.0])
    organ_extent = 1 / np.linalg.norm(direction / organ_radii)
    radius = rng.uniform(0.08, 0.1)
    centre = organ_centre + direction * (organ_extent - 0.3 * radius)
    return np.sqrt((grid[0] - centre[0]) ** 2 + (grid[1] - centre[1]) ** 2) <= radius


def inside_ellipsoid(grid: np.ndarray, centre: np.ndarray, radii: np.ndarray, wobble: float | np.ndarray = 0.0):
    distance = np.sqrt(sum(((grid[axis] - centre[axis]) / radii[axis]) ** 2 for axis in range(3)))
    return distance <= 1 + wobble


def smooth_noise(size: int, rng: np.random.Generator) -> np.ndarray:
    """Noise in [-1, 1] that varies over about a quarter of the field of view."""
    return ndimage.zoom(rng.uniform(-1, 1, (4, 4, 4)), size / 4, order=1)


def unit_vector(rng: np.random.Generator) -> np.ndarray:
    vector = rng.normal(size=3)
    return vector / np.linalg.norm(vector)


def lps_affine(rng: np.random.Generator) -> np.ndarray:
    """2 mm voxels, x and y flipped as in DICOM's LPS convention, and an off-centre origin."""
    affine = np.diag([-VOXEL_MM, -VOXEL_MM, VOXEL_MM, 1.0])
    affine[:3, 3] = np.array([120.0, 140.0, -350.0]) + rng.uniform(-5, 5, 3)
    return affine


def write_dataset_json(out: Path, cases: int) -> None:
    meta = {
        "name": "synthetic",
        "description": "CT-like phantoms; see perturbations.csv for the perturbed labels",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "organ": 1},
        "numTraining": cases,
        "file_ending": ".nii.gz",
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
