"""The label errors of real segmentation datasets, and annotation protocols other than the main one,
made on a phantom's clean organ mask so that a benchmark knows exactly what is wrong.

Every error kind takes the clean organ, the phantom's other structures, a severity 1-3 and a random
generator, and returns the wrong label and the parameters it used (for perturbations.csv):
- eroded / dilated: contours drawn too tight or too loose (the paper's Section 4.1);
- incomplete: a slab at one end of the organ, or a run of slices through it, left unlabelled;
- extra: a blob of the surrounding tissue, touching the organ, labelled as organ (a leak);
- wrong_neighbour: the adjacent structure labelled together with the organ, or instead of it;
- shift: the label displaced by a few voxels, or a run of its slices misaligned in-plane;
- holes: balls inside the organ left unlabelled.
A style is a protocol followed for a whole subset of cases: `neighbour` includes the adjacent
structure in every label, `coarse` draws contours on a grid three times coarser, `vessel` includes the
stretch of the vessel that runs along the organ (synth.phantom draws one for datasets in that style).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

CONNECTIVITY_1 = ndimage.generate_binary_structure(3, 1)
SUPERIOR_AXIS = 2  # the phantoms' third axis runs towards the head (their affine's z is positive)
COARSE_FACTOR = 3


@dataclass(frozen=True)
class Anatomy:
    """What a label error is made of: the organ, its unlabelled neighbours (adjacent structures), the body."""

    organ: np.ndarray
    neighbours: list[np.ndarray]
    body: np.ndarray
    vessel: np.ndarray  # empty where the phantom has none


LabelError = Callable[[Anatomy, int, np.random.Generator], tuple[np.ndarray, dict]]


def eroded(anatomy: Anatomy, severity: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Erode `severity` times, stopping early rather than erase the organ."""
    label = anatomy.organ
    for done in range(severity):
        smaller = ndimage.binary_erosion(label, CONNECTIVITY_1)
        if not smaller.any():
            return label, {"iterations": done}
        label = smaller
    return label, {"iterations": severity}


def dilated(anatomy: Anatomy, severity: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    return ndimage.binary_dilation(anatomy.organ, CONNECTIVITY_1, severity), {"iterations": severity}


def incomplete(anatomy: Anatomy, severity: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """The cranial end of the organ (a fifth to a half of its height) or a run of 1-3 slabs of slices left out."""
    organ = anatomy.organ
    low, high = extent(organ, SUPERIOR_AXIS)
    height = high - low + 1
    label = organ.copy()
    if rng.random() < 0.5:
        fraction = 0.1 + 0.12 * severity
        start = high + 1 - max(1, round(fraction * height))
        along(label, SUPERIOR_AXIS, slice(start, None))[...] = False
        return label, {"part": "cranial end", "fraction": round(fraction, 2), "slices": high + 1 - start}
    axis = int(rng.integers(3))
    low, high = extent(organ, axis)
    run = max(1, round((0.1 + 0.07 * severity) * (high - low + 1)))
    start = int(rng.integers(low + 1, max(low + 2, high - run)))
    along(label, axis, slice(start, start + run))[...] = False
    return label, {"part": "slices", "axis": axis, "start": start, "slices": run}


def extra(anatomy: Anatomy, severity: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A ball of the surrounding tissue, overlapping the organ's surface, labelled as organ."""
    organ, size = anatomy.organ, anatomy.organ.shape[0]
    surface = np.argwhere(organ & ~ndimage.binary_erosion(organ, CONNECTIVITY_1))
    centre_of_organ = np.argwhere(organ).mean(axis=0)
    point = surface[rng.integers(len(surface))]
    radius = (0.07 + 0.025 * severity) * size
    outward = (point - centre_of_organ) / (np.linalg.norm(point - centre_of_organ) + 1e-9)
    centre = point + outward * 0.8 * radius
    blob = ball(organ.shape, centre, radius) & anatomy.body & ~organ
    for structure in [*anatomy.neighbours, anatomy.vessel]:  # tissue, not another structure (that is wrong_neighbour)
        blob &= ~structure
    return organ | blob, {"radius_voxels": round(radius, 1), "centre": [round(float(c), 1) for c in centre]}


def wrong_neighbour(anatomy: Anatomy, severity: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """The adjacent structure labelled with the organ (severity 1-2) or instead of it (3)."""
    neighbour = anatomy.neighbours[0] & ~anatomy.organ
    if severity < 3:
        return anatomy.organ | neighbour, {"structure": "neighbour 1", "mode": "together with the organ"}
    return neighbour, {"structure": "neighbour 1", "mode": "instead of the organ"}


def shift(anatomy: Anatomy, severity: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """The whole label moved by 1-3 voxels (+1), or the slices of its upper or lower half moved in-plane."""
    organ = anatomy.organ
    distance = severity + 1
    if rng.random() < 0.5:
        offset = np.zeros(3, dtype=int)
        offset[rng.integers(3)] = distance * rng.choice([-1, 1])
        return shifted(organ, offset), {"mode": "whole label", "offset_voxels": offset.tolist()}
    low, high = extent(organ, SUPERIOR_AXIS)
    middle = (low + high + 1) // 2
    part = slice(middle, None) if rng.random() < 0.5 else slice(None, middle)
    in_plane = np.zeros(3, dtype=int)
    in_plane[rng.integers(2)] = distance * rng.choice([-1, 1])
    label = organ.copy()
    along(label, SUPERIOR_AXIS, part)[...] = along(shifted(organ, in_plane), SUPERIOR_AXIS, part)
    half = "upper" if part.start is not None else "lower"
    return label, {"mode": f"slices of the {half} half misaligned", "offset_voxels": in_plane.tolist()}


def holes(anatomy: Anatomy, severity: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """severity + 1 balls inside the organ (radius 8 % of the field of view) left unlabelled."""
    organ = anatomy.organ
    radius = max(1.5, 0.08 * organ.shape[0])
    depth = ndimage.distance_transform_edt(organ)
    inside = np.argwhere(depth > radius + 1)
    if not len(inside):
        inside = np.argwhere(depth >= depth.max())
    centres = inside[rng.choice(len(inside), size=min(severity + 1, len(inside)), replace=False)]
    label = organ.copy()
    for centre in centres:
        label &= ~ball(organ.shape, centre, radius)
    return label, {"holes": len(centres), "radius_voxels": round(radius, 1)}


ERROR_KINDS: dict[str, LabelError] = {
    "eroded": eroded,
    "dilated": dilated,
    "incomplete": incomplete,
    "extra": extra,
    "wrong_neighbour": wrong_neighbour,
    "shift": shift,
    "holes": holes,
}


def neighbour_included(anatomy: Anatomy) -> np.ndarray:
    return anatomy.organ | anatomy.neighbours[0]


def coarse_contours(anatomy: Anatomy) -> np.ndarray:
    """The organ as drawn on a grid COARSE_FACTOR times coarser: blocky, about as large."""
    organ = anatomy.organ
    coarse = ndimage.zoom(organ.astype(np.float32), 1 / COARSE_FACTOR, order=1) > 0.5
    return ndimage.zoom(coarse, np.array(organ.shape) / np.array(coarse.shape), order=0).astype(bool)


def vessel_included(anatomy: Anatomy) -> np.ndarray:
    """The organ with the stretch of vessel that runs along it (within 2 voxels), as some annotators
    include the inferior vena cava in the liver."""
    return anatomy.organ | (anatomy.vessel & ndimage.binary_dilation(anatomy.organ, CONNECTIVITY_1, 2))


STYLES: dict[str, Callable[[Anatomy], np.ndarray]] = {"neighbour": neighbour_included, "coarse": coarse_contours, "vessel": vessel_included}


def extent(mask: np.ndarray, axis: int) -> tuple[int, int]:
    """First and last index along `axis` that hold any of the mask."""
    present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
    return int(present[0]), int(present[-1])


def along(array: np.ndarray, axis: int, index: slice) -> np.ndarray:
    """A view of array[..., index, ...] with `index` on `axis`."""
    return array[(slice(None),) * axis + (index,)]


def shifted(mask: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """The mask moved by a whole number of voxels, empty where it came from outside."""
    return ndimage.shift(mask.astype(np.uint8), offset, order=0, mode="constant", cval=0) > 0


def ball(shape: tuple[int, ...], centre: np.ndarray, radius: float) -> np.ndarray:
    grid = np.indices(shape)
    return sum((grid[axis] - centre[axis]) ** 2 for axis in range(3)) <= radius**2
