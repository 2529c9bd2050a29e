"""Prepared cases as PyTorch training items."""

import numpy as np
import torch

from .augment import Augmentation
from .cache import PreparedCase, PreparedData
from .preprocess import extract_window

FOREGROUND_PROBABILITY = 1 / 3  # share of random crops centred on a foreground voxel


class TrainingSet(torch.utils.data.Dataset):
    """Item i is case i as {"case", "index", "image" [1, *roi] float32, "label" [*roi] int64}.

    With random crops each draw takes a new ROI from the stored volume, and with an augmentation
    each draw is transformed anew, both using torch's random generator so that seeding torch makes
    them reproducible.
    """

    def __init__(self, prepared: PreparedData, augmentation: Augmentation | None = None):
        self.cases = prepared.cases
        self.roi = np.array(prepared.config.roi)
        self.random_crop = prepared.config.crop == "random"
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        image, label = case.load_image(), case.load_label()
        if self.random_crop:
            start = self.draw_roi_start(case, label.shape)
            image, label = extract_window(image, start, self.roi), extract_window(label, start, self.roi)
        image = torch.from_numpy(np.array(image, dtype=np.float32))[None]
        label = torch.from_numpy(np.array(label, dtype=np.int64))
        if self.augmentation is not None:
            image, label = self.augmentation(image, label)
        return {"case": case.case_id, "index": index, "image": image, "label": label}

    def draw_roi_start(self, case: PreparedCase, shape: tuple[int, ...]) -> np.ndarray:
        """A ROI around a random foreground voxel (1/3 of the draws), else anywhere in the volume."""
        room = np.array(shape) - self.roi
        foreground = case.load_foreground()
        if len(foreground) and torch.rand(()) < FOREGROUND_PROBABILITY:
            voxel = np.unravel_index(int(foreground[torch.randint(len(foreground), ()).item()]), shape)
            return np.clip(np.array(voxel) - self.roi // 2, 0, room)
        return np.array([torch.randint(int(extra) + 1, ()).item() for extra in room])
