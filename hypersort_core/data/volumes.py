"""Reading a case's volumes and validating them on the way, so that each file is read only once.

nibabel is imported where a file is opened, not at import: the model, the training step and the
benchmarks then import without it (the GPU machines' image has no nibabel).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import DataError
from .labels import LabelSelection
from .layouts import Case

if TYPE_CHECKING:
    import nibabel as nib

try:  # optional (pip install 'hypersort-core[fast-gzip]'): reads gzip NIfTI faster
    from isal import igzip, isal_zlib
except ImportError:
    igzip = isal_zlib = None

AFFINE_TOLERANCE = 1e-3  # relative; also in voxel sizes where an affine entry is near zero
MAX_EXTENT_MM = 10_000  # no scan is 10 m wide: a header that says so has wrong voxel sizes
VOXEL_MM_RANGE = (1e-3, 100.0)  # voxel sizes a scan can have (README: bad input); outside it, the header is wrong
DEFLATE_MAX_RATIO = 1032  # deflate never expands data more than this (zlib's technical details)
SHOWN_VALUES = 10
FEW_VALUES = 16  # integer label values spanning up to this many are found by comparisons, more by a histogram
HISTOGRAM_MAX_BINS = 2**20  # label values spanning more are found by np.unique
SLAB_VOXELS = 2**23  # values are counted slab by slab: the int64 copy of a slab is 64 MiB


@dataclass
class LabelledVolume:
    """An image and its class map on one voxel grid; `affine` maps voxel indices to world mm."""

    image: np.ndarray  # float32
    label: np.ndarray  # uint8 classes 0..K
    affine: np.ndarray


def read_case(case: Case, selection: LabelSelection, declared_values: set[int] | None) -> LabelledVolume:
    """The image and the selected classes of a case, after checking they are sound and aligned.

    All headers are checked before any voxel data is read, so a misaligned or missing label
    costs no decompression of the image.
    """
    image_nifti = open_nifti(case.image, f"image file is missing for case {case.case_id!r}")
    shape = spatial_shape(image_nifti, case.image)
    check_affine(image_nifti.affine, shape, case.image)
    label_niftis = {path: open_aligned_label(path, shape, image_nifti.affine, case.image) for path in label_files(case, selection)}
    image = read_finite_image(image_nifti, case.image)
    if isinstance(case.label, dict):
        classes = structure_classes(label_niftis, selection, shape)
    else:
        label_map = read_voxels(label_niftis[case.label], case.label)
        check_label_values(label_map, declared_values, case.label)
        classes = selection.classes_of(label_map)
    return LabelledVolume(image, classes, image_nifti.affine)


def read_finite_image(nifti: nib.spatialimages.SpatialImage, path: Path) -> np.ndarray:
    image = read_voxels(nifti, path, np.float32)
    non_finite = image.size - np.count_nonzero(np.isfinite(image))
    if non_finite:
        raise DataError(path, f"image holds {non_finite} NaN or infinite voxels")
    return image


def structure_classes(masks: dict[Path, nib.spatialimages.SpatialImage], selection: LabelSelection, shape: tuple[int, ...]) -> np.ndarray:
    """TotalSegmentator masks in selection order as classes 1..K, or their union as class 1."""
    classes = np.zeros(shape, dtype=np.uint8)
    for number, (path, nifti) in enumerate(masks.items(), start=1):
        classes[read_voxels(nifti, path) != 0] = 1 if selection.is_binary else number
    return classes


def case_files(case: Case, selection: LabelSelection) -> list[Path]:
    """The files `read_case` reads for this selection."""
    return [case.image, *label_files(case, selection)]


def label_files(case: Case, selection: LabelSelection) -> list[Path]:
    """The label file, or for TotalSegmentator the selected masks (all of them for the binary selection)."""
    if not isinstance(case.label, dict):
        return [case.label]
    structures = list(case.label) if selection.is_binary else selection.names
    return [case.label[structure] for structure in structures]


def open_aligned_label(path: Path, shape: tuple[int, ...], affine: np.ndarray, image_path: Path) -> nib.spatialimages.SpatialImage:
    """A label file, after checking from its header that it lies on the image's grid."""
    nifti = open_nifti(path, f"label file is missing for image {image_path}")
    label_shape = spatial_shape(nifti, path)
    if label_shape != shape:
        raise DataError(path, f"label shape {label_shape} differs from the image's {shape} ({image_path})")
    if not same_grid(nifti.affine, affine):
        offset = np.abs(nifti.affine - affine).max()
        raise DataError(path, f"label affine differs from the image's by up to {offset:.4g} ({image_path})")
    return nifti


def check_affine(affine: np.ndarray, shape: tuple[int, ...], path: Path) -> None:
    """The one check of an image's geometry, for every command that reads images (fit, check, predict,
    correct, evaluate), before any voxel is read.  Reorienting and resampling need a finite voxel-to-world affine that keeps all three axes apart
    and gives the volume a size a scan can have."""
    if not np.isfinite(affine).all():
        raise DataError(path, "affine (qform/sform) holds NaN or infinite values")
    sizes = voxel_sizes(affine)
    described = "x".join(f"{size:g}" for size in sizes)
    if np.linalg.matrix_rank(affine[:3, :3]) < 3:
        raise DataError(path, f"affine (qform/sform) is degenerate: voxel sizes {described} mm, or axes that coincide")
    low, high = VOXEL_MM_RANGE
    if sizes.min() < low or sizes.max() > high:
        raise DataError(path, f"voxel sizes {described} mm lie outside {low:g}-{high:g} mm: the header's affine (qform/sform) is wrong")
    if (sizes * shape).max() > MAX_EXTENT_MM:
        raise DataError(path, f"voxel sizes {described} mm make the volume wider than {MAX_EXTENT_MM / 1000:g} m")


def same_grid(affine: np.ndarray, reference: np.ndarray) -> bool:
    """Affines agree within 1e-3 relative, and within 1e-3 of a voxel for entries near zero."""
    atol = AFFINE_TOLERANCE * voxel_sizes(reference).max()
    return np.allclose(affine, reference, rtol=AFFINE_TOLERANCE, atol=atol)


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def check_label_values(label_map: np.ndarray, declared_values: set[int] | None, path: Path) -> None:
    """Labels must hold integers, and only the values the dataset declares where it declares any."""
    values = distinct_values(label_map)
    if declared_values is not None:
        undeclared = values[~np.isin(values, sorted(declared_values))]
        if len(undeclared):
            raise DataError(
                path,
                f"label values {format_values(undeclared)} are not declared in dataset.json (declared: {format_values(sorted(declared_values))})",
            )
    elif np.issubdtype(label_map.dtype, np.floating):
        fractional = values[values != np.round(values)]
        if len(fractional):
            raise DataError(path, f"label holds non-integer values {format_values(fractional)}")


def distinct_values(array: np.ndarray) -> np.ndarray:
    """np.unique(array) at the cost of a few passes, without sorting or copying the volume: the minimum
    and maximum, then for the values between them a comparison each (up to FEW_VALUES of them) or a
    histogram slab by slab; np.unique only for what no histogram holds (fractions, NaN, a vast range)."""
    values = array.view(np.uint8) if array.dtype == bool else array
    if not array.size or values.dtype.kind not in "iuf":
        return np.unique(array)
    low, high = values.min(), values.max()
    if not (np.isfinite(low) and np.isfinite(high)) or high - low >= HISTOGRAM_MAX_BINS:
        return np.unique(array)
    low, high = int(low), int(high)
    if values.dtype.kind in "iu" and high - low <= FEW_VALUES:
        found = [low, *(value for value in range(low + 1, high) if (values == value).any()), high]
        return np.unique(np.array(found)).astype(array.dtype)
    counts = np.zeros(high - low + 1, dtype=np.int64)
    for slab in slabs(values):
        integers = slab.astype(np.int64)
        if values.dtype.kind == "f" and not np.array_equal(integers, slab):
            return np.unique(array)
        counts += np.bincount((integers - low).ravel(order="K"), minlength=len(counts))
    return (np.flatnonzero(counts) + low).astype(array.dtype)


def slabs(array: np.ndarray, voxels: int = SLAB_VOXELS) -> list[np.ndarray]:
    """Views of `array` in slabs of about `voxels`, cut along its slowest axis (the last for NIfTI's Fortran order)."""
    axis = array.ndim - 1 if array.flags.f_contiguous else 0
    return np.array_split(array, max(1, math.ceil(array.size / voxels)), axis=axis)


def open_nifti(path: Path, missing_problem: str) -> nib.spatialimages.SpatialImage:
    import nibabel as nib

    try:
        return nib.load(path)
    except FileNotFoundError as error:
        raise DataError(path, missing_problem) from error
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, OSError, EOFError, ValueError, zlib.error) as error:
        raise DataError(path, f"not a readable NIfTI file ({one_line(error)})") from error


def spatial_shape(nifti: nib.spatialimages.SpatialImage, path: Path) -> tuple[int, int, int]:
    """The 3-D shape of a volume; trailing singleton dimensions are allowed, other ranks are not."""
    shape = tuple(int(size) for size in nifti.shape)
    if len(shape) < 3:
        raise DataError(path, f"volume is {len(shape)}-D (shape {shape}); a 3-D volume is needed")
    if any(size < 1 for size in shape):
        raise DataError(path, f"header gives the volume shape {shape}; every side needs at least one voxel")
    if any(size != 1 for size in shape[3:]):
        problem = "multi-channel or time-series volumes are not supported"
        raise DataError(path, f"volume is {len(shape)}-D (shape {shape}); {problem}")
    return shape[:3]


def read_voxels(nifti: nib.spatialimages.SpatialImage, path: Path, dtype: type | None = None) -> np.ndarray:
    """The voxel array in 3-D; a truncated or corrupt file fails here, as the data is decompressed."""
    try:
        check_data_fits(nifti, path)
        data = np.asarray(decompressed_by_isal(nifti, path).dataobj, dtype=dtype)
    except (OSError, EOFError, ValueError, zlib.error) as error:
        raise DataError(path, f"truncated or corrupt NIfTI data ({one_line(error)})") from error
    return data.reshape(data.shape[:3])


def decompressed_by_isal(nifti: nib.spatialimages.SpatialImage, path: Path) -> nib.spatialimages.SpatialImage:
    """A gzip NIfTI decompressed at once by ISA-L's igzip (the optional `isal` package: about twice zlib's
    speed, and gzip is most of the cost of reading a CT), where it is installed and the file's gzip trailer
    gives the size its header implies; otherwise, and for a file igzip cannot read, the image as nibabel
    opened it, so that nibabel's own reading names the problem."""
    if igzip is None or not path.name.endswith(".gz") or not hasattr(type(nifti), "from_bytes"):
        return nifti
    compressed = path.read_bytes()
    expected = getattr(nifti.dataobj, "offset", 0) + math.prod(nifti.shape) * nifti.header.get_data_dtype().itemsize
    if len(compressed) < 4 or int.from_bytes(compressed[-4:], "little") != expected % 2**32:  # ISIZE: the size mod 2**32
        return nifti
    try:
        return type(nifti).from_bytes(igzip.decompress(compressed))
    except (EOFError, OSError, ValueError, isal_zlib.error):
        return nifti


def check_data_fits(nifti: nib.spatialimages.SpatialImage, path: Path) -> None:
    """nibabel allocates what the header declares before reading: a damaged header must not claim terabytes."""
    dtype = nifti.header.get_data_dtype()
    declared = math.prod(nifti.shape) * dtype.itemsize
    size = path.stat().st_size
    if path.name.endswith(".gz"):
        room = size * DEFLATE_MAX_RATIO
    else:
        room = size - nifti.header.get_data_offset()
    if declared > room:
        problem = f"header declares {nifti.shape} voxels of {dtype} ({declared} bytes), more than the file can hold"
        raise DataError(path, f"{problem}; the file is truncated or its header damaged")


def one_line(error: Exception) -> str:
    """nibabel's messages span lines; the CLI reports an error in one."""
    return " ".join(str(error).split())


def format_values(values) -> str:
    shown = ", ".join(f"{value:g}" for value in list(values)[:SHOWN_VALUES])
    return shown + (", ..." if len(values) > SHOWN_VALUES else "")


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(needed_bytes: float, path: Path, what: str) -> None:
    """Refuse, before allocating, work that needs more memory than the machine has available."""
    available = available_memory_bytes()
    if available is not None and needed_bytes > available:
        raise DataError(path, f"{what} would need {needed_bytes / 2**30:.3g} GiB of memory, more than the {available / 2**30:.3g} GiB available")
