"""Training-time augmentation: image and label move together, exactly, and only as far as asked."""

import math

import numpy as np
import pytest
import torch

from hypersort_core.data.augment import Augmentation, resample_both, rotation


def volume(shape=(10, 14, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand((1, *shape), generator=generator)
    label = (image[0] > 0.7).long()
    return image, label


def test_identity_transform_keeps_every_voxel():
    image, label = volume()
    moved_image, moved_label = resample_both(image, label, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(moved_image, image)
    assert torch.equal(moved_label, label)


@pytest.mark.parametrize("axes", [(0, 1), (0, 2), (1, 2)])
def test_quarter_turn_on_a_non_cubic_volume_is_a_quarter_turn(axes):
    """A rotation in voxel units, whatever the ROI's sides: a 90-degree turn of a square cross-section is np.rot90."""
    shape = [9, 9, 9]
    shape[3 - sum(axes)] = 5  # the axis the rotation leaves alone may differ
    image, label = volume(tuple(shape))
    angles = [0.0, 0.0, 0.0]
    angles[3 - sum(axes)] = math.pi / 2
    matrix = rotation(*angles)
    moved_image, moved_label = resample_both(image, label, matrix)
    candidates = [np.rot90(label.numpy(), k, axes) for k in (1, 3)]
    assert any(np.array_equal(moved_label.numpy(), candidate) for candidate in candidates)
    assert any(np.allclose(moved_image[0].numpy(), np.rot90(image[0].numpy(), k, axes), atol=1e-5) for k in (1, 3))


def test_random_draws_move_image_and_label_together_and_are_reproducible():
    image = torch.zeros(1, 24, 24, 24)
    image[0, 6:18, 8:16, 5:19] = 1.0
    label = (image[0] > 0.5).long()
    augmentation = Augmentation(intensity_scale=(1.0, 1.0), intensity_shift=0.0)
    torch.manual_seed(4)
    first = augmentation(image, label)
    torch.manual_seed(4)
    again = augmentation(image, label)
    assert torch.equal(first[1], again[1]) and torch.equal(first[0], again[0])
    moved_image, moved_label = first
    assert not torch.equal(moved_label, label)
    inside = moved_image[0][moved_label == 1]
    assert inside.mean() > 0.9  # the label still covers the bright box it was drawn on
    assert 0.85**3 * 0.9 < moved_label.sum() / label.sum() < 1.15**3 * 1.1


def test_intensity_jitter_stays_within_its_ranges():
    image, label = volume()
    augmentation = Augmentation(rotation_degrees=0.0, scale=(1.0, 1.0), intensity_scale=(0.9, 1.1), intensity_shift=0.05)
    torch.manual_seed(1)
    for _ in range(5):
        moved, moved_label = augmentation(image, label)
        assert torch.equal(moved_label, label)
        ratio = (moved - moved.mean()) / (image - image.mean())
        assert 0.9 - 1e-4 <= float(ratio.median()) <= 1.1 + 1e-4
