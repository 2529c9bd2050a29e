"""The paper's preprocessing: RAS orientation, isotropic spacing, percentile intensity scaling and a
fixed-size region of interest. Every step keeps the voxel-to-world affine exact, so that later code
can map predictions on the prepared grid back onto the original image."""

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .errors import DataError
from .volumes import LabelledVolume, voxel_sizes

CROPS = ("label", "image", "random")
SPACING_TOLERANCE = 1e-3  # mm; closer spacings are kept rather than resampled
MAX_RESAMPLED_VOXELS = 2**31  # larger grids come from a broken header, not from a scan


@dataclass(frozen=True)
class PreprocessConfig:
    """How cases are prepared; `to_dict` is what config.json records."""

    spacing: tuple[float, float, float] | None = (2.0, 2.0, 2.0)  # mm; None keeps each image's spacing
    roi: tuple[int, int, int] = (168, 168, 168)
    reorient: bool = True  # to the closest RAS orientation
    clip_percentiles: tuple[float, float] | None = (0.5, 99.5)  # None keeps the raw intensities
    crop: str = "label"  # ROI centred on the label's bounding box, on the image, or drawn at random

    def __post_init__(self):
        if self.spacing is not None:
            object.__setattr__(self, "spacing", tuple(float(size) for size in self.spacing))
            if len(self.spacing) != 3 or not all(0 < size < math.inf for size in self.spacing):  # NaN too
                raise ValueError(f"spacing must be three positive sizes in mm, got {self.spacing}")
        object.__setattr__(self, "roi", tuple(int(size) for size in self.roi))
        if len(self.roi) != 3 or min(self.roi) <= 0:
            raise ValueError(f"roi must be three positive sizes in voxels, got {self.roi}")
        if self.clip_percentiles is not None:
            object.__setattr__(self, "clip_percentiles", tuple(float(p) for p in self.clip_percentiles))
            low, high = self.clip_percentiles
            if not 0 <= low < high <= 100:
                raise ValueError(f"clip_percentiles must be 0 <= low < high <= 100, got {self.clip_percentiles}")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")

    def to_dict(self) -> dict:
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "PreprocessConfig":
        return cls(**values)


def preprocess(volume: LabelledVolume, config: PreprocessConfig) -> LabelledVolume:
    """Apply the configured steps in the paper's order; the label follows the image's geometry."""
    if config.reorient:
        volume = reorient_to_ras(volume)
    if config.spacing is not None:
        volume = resample(volume, config.spacing)
    if config.clip_percentiles is not None:
        volume = replace(volume, image=clip_and_scale(volume.image, config.clip_percentiles))
    start, size = roi_window(volume.label, config)
    return LabelledVolume(
        extract_window(volume.image, start, size),
        extract_window(volume.label, start, size),
        volume.affine @ translation(start),
    )


def reorient_to_ras(volume: LabelledVolume) -> LabelledVolume:
    """Flip and permute axes to the closest RAS orientation (as nibabel's as_closest_canonical)."""
    from nibabel import orientations  # imported here: see volumes.py

    orientation = orientations.io_orientation(volume.affine)
    return LabelledVolume(
        orientations.apply_orientation(volume.image, orientation),
        orientations.apply_orientation(volume.label, orientation),
        volume.affine @ orientations.inv_ornt_aff(orientation, volume.image.shape),
    )


def resample(volume: LabelledVolume, spacing: tuple[float, float, float]) -> LabelledVolume:
    """Resample to exactly `spacing` (linear for the image, nearest for the label, edges extended).

    The new grid keeps the old grid's centre and covers its extent; voxel i of the new grid
    lies at voxel step * i + offset of the old one.  The grids share their axes, so both
    interpolations are separable: one axis at a time, as scipy.ndimage.zoom computes them, but
    in a few whole-array gathers instead of a loop over every voxel's eight neighbours.
    """
    current = voxel_sizes(volume.affine)
    target = np.asarray(spacing)
    if np.allclose(current, target, rtol=0, atol=SPACING_TOLERANCE):
        return volume
    old_shape = np.array(volume.image.shape)
    new_shape = resampled_shape(old_shape, current, target).astype(int)
    step = target / current
    offset = ((old_shape - 1) - (new_shape - 1) * step) / 2
    grid = np.eye(4)
    grid[:3, :3] = np.diag(step)
    grid[:3, 3] = offset
    image, label = volume.image, volume.label
    for axis in gather_order(new_shape / old_shape):
        positions = step[axis] * np.arange(new_shape[axis]) + offset[axis]
        image = interpolate_along(image, axis, positions)
        label = nearest_along(label, axis, positions)
    return LabelledVolume(image, label, volume.affine @ grid)


def gather_order(ratios: np.ndarray) -> list[int]:
    """The axis that shrinks most first, so that the later passes move less; among equals the later axis
    first (measured on Fortran-ordered CTs: its gathers copy longer runs)."""
    last = len(ratios) - 1
    return [last - axis for axis in np.argsort(ratios[::-1], kind="stable")]


def interpolate_along(array: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of `array` at fractional `positions` along `axis`; beyond the ends, the edge value."""
    below = np.floor(positions)
    weight = (positions - below).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
    last = array.shape[axis] - 1
    lower = take_along(array, axis, np.clip(below, 0, last))
    upper = take_along(array, axis, np.clip(below + 1, 0, last))
    lower *= 1 - weight
    upper *= weight
    lower += upper
    return lower


def nearest_along(array: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """The voxel nearest each position along `axis` (a tie goes up, as in scipy.ndimage); beyond the ends, the edge voxel."""
    return take_along(array, axis, np.clip(np.floor(positions + 0.5), 0, array.shape[axis] - 1))


def take_along(array: np.ndarray, axis: int, indices: np.ndarray) -> np.ndarray:
    """array's slices `indices` along `axis`, by indexing (which keeps the memory order; np.take makes
    a C-ordered copy, several times slower on NIfTI's Fortran-ordered volumes)."""
    return array[(slice(None),) * axis + (indices.astype(np.intp),)]


def resampled_shape(shape: np.ndarray, current: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The grid size (as floats, which cannot overflow) that covers the volume at the target spacing."""
    return np.maximum(1, np.round(shape * current / target))


def check_resampled_size(volume: LabelledVolume, config: PreprocessConfig, path: Path) -> None:
    """Absurd voxel sizes in a header would make resampling exhaust the memory: refuse them first."""
    if config.spacing is None:
        return
    sizes = voxel_sizes(volume.affine)
    shape = resampled_shape(np.array(volume.image.shape), sizes, np.asarray(config.spacing))
    if np.prod(shape) > MAX_RESAMPLED_VOXELS:
        current = "x".join(f"{size:g}" for size in sizes)
        problem = f"voxel sizes {current} mm resampled to {config.spacing} mm would make {shape.prod():.3g} voxels"
        raise DataError(path, f"{problem}; the header's voxel sizes or the spacing setting are wrong")


def clip_and_scale(image: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Clip to the image's own percentiles and scale to [0, 1]; a constant image becomes 0."""
    low, high = np.percentile(image, percentiles)
    if high <= low:
        return np.zeros_like(image)
    return ((np.clip(image, low, high) - low) / (high - low)).astype(np.float32)


def roi_window(label: np.ndarray, config: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """Start and size of the stored window; it may reach outside the volume, which pads it.

    For random crops the whole volume is kept, padded (centred) to at least the ROI, and the
    training set draws its ROI from it.
    """
    shape = np.array(label.shape)
    roi = np.array(config.roi)
    if config.crop == "random":
        return np.minimum(0, (shape - roi) // 2), np.maximum(shape, roi)
    centre = foreground_centre(label) if config.crop == "label" else (shape - 1) / 2
    return np.floor(centre + 0.5).astype(int) - roi // 2, roi


def foreground_centre(label: np.ndarray) -> np.ndarray:
    """Centre of the label's bounding box; the volume's centre for an empty label."""
    foreground = np.argwhere(label)
    if not len(foreground):
        return (np.array(label.shape) - 1) / 2
    return (foreground.min(axis=0) + foreground.max(axis=0)) / 2


def extract_window(array: np.ndarray, start: np.ndarray, size: np.ndarray) -> np.ndarray:
    """array[start : start + size], with zeros where the window reaches outside the array."""
    window = np.zeros(tuple(int(length) for length in size), dtype=array.dtype)
    source_start = np.maximum(start, 0)
    source_stop = np.minimum(np.asarray(start) + size, array.shape)
    if np.any(source_stop <= source_start):
        return window
    target = tuple(slice(a - s, b - s) for a, b, s in zip(source_start, source_stop, start))
    source = tuple(slice(a, b) for a, b in zip(source_start, source_stop))
    window[target] = array[source]
    return window


def translation(offset: np.ndarray) -> np.ndarray:
    """The affine of moving voxel indices by `offset`."""
    matrix = np.eye(4)
    matrix[:3, 3] = offset
    return matrix
