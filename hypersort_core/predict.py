"""`hsort predict`: segment new images in a chosen style, each label in its image's own geometry.

An image is prepared as the training cases were (RAS orientation, the run's spacing, percentile
scaling) but kept whole, and padded (centred) to at least the ROI. ROI-sized windows overlapping by
half cover it; each window's softmax is weighted by a Gaussian importance map (nnU-Net's: sigma =
ROI/8, so window borders, which see the least context, count least), summed, and the class map is
the argmax. Every window is segmented by the UNet of one latent. Each voxel of the original image
then takes the class at its own centre on the prepared grid (nearest neighbour through the two
affines), which undoes padding, resampling and reorientation.
"""

from __future__ import annotations

import functools
import glob
import gzip
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from hypersort_core.atomic import atomic_open
from hypersort_core.data import DataError, PreprocessConfig
from hypersort_core.data.cache import output_file_name
from hypersort_core.data.layouts import NIFTI_ENDINGS, files_ending, nifti_case_id
from hypersort_core.data.preprocess import preprocess, resampled_shape
from hypersort_core.data.volumes import (
    LabelledVolume,
    check_affine,
    check_memory,
    open_nifti,
    read_finite_image,
    spatial_shape,
    voxel_sizes,
)
from hypersort_core.run import Run

if TYPE_CHECKING:
    import nibabel as nib

Probabilities = Callable[[torch.Tensor], torch.Tensor]  # windows [B, 1, *roi] -> softmax [B, C, *roi]

WINDOW_OVERLAP = 0.5
IMPORTANCE_SIGMA = 1 / 8  # of the ROI side
WINDOWS_PER_BATCH = 4
GLOB_CHARACTERS = "*?["
NNUNET_CHANNEL_SUFFIX = "_0000"
GZIP_LEVEL = 1  # nibabel's own default for .nii.gz


@dataclass
class SourceImage:
    """An input image as read: its voxels, and the header its label is written with."""

    path: Path
    nifti: nib.spatialimages.SpatialImage
    image: np.ndarray  # float32, 3-D

    @property
    def affine(self) -> np.ndarray:
        return self.nifti.affine


# ---------------------------------------------------------------------------------------------
# Inputs and outputs


def image_paths(arguments: Iterable[str]) -> list[Path]:
    """The images named by files, folders (every .nii.gz/.nii in them) and glob patterns, in order."""
    paths = itertools.chain.from_iterable(expand_argument(argument) for argument in arguments)
    return list(dict.fromkeys(paths))


def expand_argument(argument: str) -> list[Path]:
    """Patterns are expanded here, so that a quoted glob works as well as one the shell expanded."""
    path = Path(argument).expanduser()
    if path.is_dir():
        images = files_ending(path, NIFTI_ENDINGS)
        if not images:
            raise DataError(path, "folder holds no .nii.gz or .nii image")
        return images
    if path.exists() or not any(character in argument for character in GLOB_CHARACTERS):
        return [path]
    images = sorted(Path(match) for match in glob.glob(str(path)) if match.endswith(NIFTI_ENDINGS) and Path(match).is_file())
    if not images:
        raise DataError(path, "no .nii.gz or .nii image matches this pattern")
    return images


def output_name(image: Path) -> str:
    """nnU-Net's naming: {case}_0000.nii.gz (channel 0) gives {case}.nii.gz; x.nii gives x.nii.gz
    (a name that would be hidden or too long is made safe: see output_file_name)."""
    return output_file_name(nifti_case_id(image).removesuffix(NNUNET_CHANNEL_SUFFIX))


def output_names(images: list[Path]) -> dict[Path, str]:
    """Each image's output file name; two images may not share one."""
    names: dict[Path, str] = {}
    for image in images:
        name = output_name(image)
        clash = next((other for other, taken in names.items() if taken == name), None)
        if clash is not None:
            raise DataError(image, f"would be written to {name}, as {clash} is")
        names[image] = name
    return names


def read_image(path: Path, config: PreprocessConfig | None = None, classes: int = 2) -> SourceImage:
    """A 3-D image with a sound geometry and finite voxels; anything else is a DataError naming the file.
    With the run's `config`, an image whose segmentation would need more memory than is available is
    refused before any voxel is read."""
    nifti = open_nifti(path, "image file is missing")
    shape = spatial_shape(nifti, path)
    check_affine(nifti.affine, shape, path)
    if config is not None:
        check_memory(segmentation_bytes(shape, nifti.affine, config, classes), path, "segmenting this image")
    return SourceImage(path, nifti, read_finite_image(nifti, path))


def segmentation_bytes(shape: tuple[int, ...], affine: np.ndarray, config: PreprocessConfig, classes: int) -> float:
    """About the memory segmenting an image takes: on the prepared grid (padded to the ROI) the image, the
    summed probabilities of every class and the weights (float32), and on the original grid the image and its label."""
    sizes = voxel_sizes(affine)
    prepared = resampled_shape(np.array(shape), sizes, np.asarray(config.spacing)) if config.spacing is not None else np.array(shape, dtype=float)
    prepared = np.maximum(prepared, config.roi)
    return float(np.prod(prepared)) * 4 * (classes + 3) + float(np.prod(np.array(shape, dtype=float))) * (4 + 2)


def save_label(label: np.ndarray, source: nib.spatialimages.SpatialImage, path: Path) -> Path:
    """Write a label map on the source image's grid, keeping its header (qform and sform too), atomically."""
    header = source.header.copy()
    header.set_data_dtype(label.dtype)
    nifti = type(source)(label, source.affine, header)
    with atomic_open(path, "wb") as handle:
        handle.write(gzip.compress(nifti.to_bytes(), compresslevel=GZIP_LEVEL))
    return path


# ---------------------------------------------------------------------------------------------
# Segmenting one image


def prepare_image(image: np.ndarray, affine: np.ndarray, config: PreprocessConfig) -> LabelledVolume:
    """The image on the run's grid, whole and padded (centred) to at least the ROI.

    An image-only adapter of `preprocess`: a blank label rides along, and the "random" crop is the
    one that keeps the whole volume (padded to the ROI), which is what a sliding window needs.
    """
    blank = np.zeros(image.shape, dtype=np.uint8)
    return preprocess(LabelledVolume(image, blank, affine), replace(config, crop="random"))


def window_starts(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float = WINDOW_OVERLAP) -> list[tuple[int, ...]]:
    """Window corners evenly spread so that neighbours overlap by at least `overlap` and the last one ends at the border."""
    per_axis = []
    for size, side in zip(shape, roi):
        count = math.ceil((size - side) / (side * (1 - overlap))) + 1
        per_axis.append(sorted({round(position) for position in np.linspace(0, size - side, count)}))
    return list(itertools.product(*per_axis))


@functools.lru_cache(maxsize=4)
def importance_map(roi: tuple[int, ...]) -> torch.Tensor:
    """A Gaussian peaking at 1 in the window's centre, sigma = ROI/8 along each axis."""
    axes = [torch.exp(-0.5 * ((torch.arange(side) - (side - 1) / 2) / (side * IMPORTANCE_SIGMA)) ** 2) for side in roi]
    return axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]


def sliding_window_classes(image: np.ndarray, roi: tuple[int, ...], probabilities: Probabilities) -> np.ndarray:
    """Class map of an image at least as large as the ROI: importance-weighted mean of the windows' softmax, then argmax."""
    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    weight = importance_map(tuple(roi))
    regions = [tuple(slice(start, start + side) for start, side in zip(corner, roi)) for corner in window_starts(volume.shape, roi)]
    summed, weights = None, torch.zeros(volume.shape)
    for first in range(0, len(regions), WINDOWS_PER_BATCH):
        batch = regions[first : first + WINDOWS_PER_BATCH]
        softmax = probabilities(torch.stack([volume[region] for region in batch])[:, None]).float().cpu()
        if summed is None:
            summed = torch.zeros(softmax.shape[1], *volume.shape)
        for region, window in zip(batch, softmax):
            summed[(slice(None), *region)] += window * weight
            weights[region] += weight
    return (summed / weights).argmax(dim=0).to(torch.uint8).numpy()


def to_original_grid(classes: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], original_affine: np.ndarray) -> np.ndarray:
    """The class of each original voxel: the prepared voxel nearest to its centre (through both affines)."""
    original_to_prepared = np.linalg.inv(affine) @ original_affine
    return ndimage.affine_transform(classes, original_to_prepared[:3, :3], original_to_prepared[:3, 3], output_shape=tuple(shape), order=0, mode="nearest")


def segment_prepared(
    prepared: LabelledVolume, probabilities: Probabilities, roi: tuple[int, ...], shape: tuple[int, ...], original_affine: np.ndarray
) -> np.ndarray:
    """Class map (uint8) of a prepared image, on the original grid of the given shape and affine."""
    classes = sliding_window_classes(prepared.image, roi, probabilities)
    return to_original_grid(classes, prepared.affine, shape, original_affine)


def segment(image: np.ndarray, affine: np.ndarray, probabilities: Probabilities, config: PreprocessConfig) -> np.ndarray:
    """Class map (uint8) of one original image [X, Y, Z] with voxel-to-world `affine`, on that same grid."""
    prepared = prepare_image(image, affine, config)
    return segment_prepared(prepared, probabilities, config.roi, image.shape, affine)


def latent_probabilities(run: Run, latent: np.ndarray) -> Probabilities:
    """The run's softmax for windows, every window segmented by the UNet of this one latent."""
    return functools.partial(run.probabilities, latent=latent)


# ---------------------------------------------------------------------------------------------
# Many images, one or several styles


def predict_images(run: Run, images: list[Path], folders: dict[Path, np.ndarray], progress: bool = True) -> list[Path]:
    """Segment every image with each folder's latent into that folder as {case}.nii.gz; the written files.

    Each image is read and prepared once, however many latents segment it.
    """
    names = output_names(images)
    config = run.config.preprocess
    segmenters = {folder: latent_probabilities(run, latent) for folder, latent in folders.items()}
    written = []
    for path in tqdm(images, desc="predicting", unit="image", disable=not progress):
        source = read_image(path, config, run.config.model.out_channels)
        prepared = prepare_image(source.image, source.affine, config)
        for folder, probabilities in segmenters.items():
            classes = segment_prepared(prepared, probabilities, config.roi, source.image.shape, source.affine)
            written.append(save_label(classes, source.nifti, Path(folder) / names[path]))
    return written
