"""Training-time augmentation: a small random rotation and scaling, and an intensity jitter.

Why: HyperSORT finds a wrong label only while the shared UNet cannot learn it by heart; then fitting
that label needs the case's own latent, which leaves the origin.  A small dataset seen for many epochs
through the same voxels is learned by heart, wrong labels included.  Each draw here moves every
voxel a little (image and label alike, so a wrong label stays exactly as wrong), which a UNet cannot
memorise, as the paper's runs on hundreds of CTs with random ROIs could not.  No flips: left and right
are different anatomy.  Draws use torch's global generator, so seeding torch (and the checkpointed
random state) makes them reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random transform, each drawn uniformly per item."""

    rotation_degrees: float = 15.0  # about each axis
    scale: tuple[float, float] = (0.85, 1.15)  # isotropic zoom
    intensity_scale: tuple[float, float] = (0.9, 1.1)  # contrast, on the [0, 1] intensities
    intensity_shift: float = 0.05  # brightness, added

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image [C, *spatial] float, label [*spatial] int: the same random transform applied to both."""
        angles = [math.radians(uniform(-self.rotation_degrees, self.rotation_degrees)) for _ in range(3)]
        matrix = rotation(*angles) / uniform(*self.scale)
        image, label = resample_both(image, label, matrix)
        return image * uniform(*self.intensity_scale) + uniform(-self.intensity_shift, self.intensity_shift), label


def resample_both(image: torch.Tensor, label: torch.Tensor, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output voxel v (from the volume's centre, in voxels) takes the input at matrix @ v: linear for
    the image, nearest for the label, zero (air, background) outside."""
    grid = sampling_grid(matrix, label.shape)
    image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    label = F.grid_sample(label[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[0, 0]
    return image, label.round().to(torch.int64)


def sampling_grid(matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """affine_grid for `matrix` in voxel units, so that a rotation stays a rotation on a non-cubic ROI.

    affine_grid works in coordinates normalised to [-1, 1] per axis and lists the axes fastest first."""
    sides = torch.tensor(list(shape), dtype=torch.float64)
    normalised = matrix * sides[None, :] / sides[:, None]
    theta = torch.cat([normalised.flip(0, 1), torch.zeros(3, 1, dtype=torch.float64)], dim=1).float()
    return F.affine_grid(theta[None], (1, 1, *shape), align_corners=False)


def uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def rotation(alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """The rotation about the three axes in turn, as a 3x3 float64 matrix."""
    ca, sa, cb, sb, cg, sg = math.cos(alpha), math.sin(alpha), math.cos(beta), math.sin(beta), math.cos(gamma), math.sin(gamma)
    about_x = torch.tensor([[1, 0, 0], [0, ca, -sa], [0, sa, ca]], dtype=torch.float64)
    about_y = torch.tensor([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]], dtype=torch.float64)
    about_z = torch.tensor([[cg, -sg, 0], [sg, cg, 0], [0, 0, 1]], dtype=torch.float64)
    return about_z @ about_y @ about_x
