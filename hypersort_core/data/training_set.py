"""Prepared cases as PyTorch training items, and the batches training takes of them."""

from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import default_collate

from .augment import Augmentation
from .cache import PreparedCase, PreparedData, check_array
from .preprocess import PreprocessConfig, extract_window, roi_window

UNREADABLE = (OSError, ValueError, EOFError)  # what numpy raises for a missing, truncated or overwritten .npy

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


class ReadableCases(torch.utils.data.Dataset):
    """A training set whose case with unreadable cached arrays is returned as a marker instead of raising,
    so that one damaged file costs one case and not the run (collate_readable lists the markers apart)."""

    def __init__(self, training_set: TrainingSet) -> None:
        self.training_set = training_set

    def __len__(self) -> int:
        return len(self.training_set)

    def __getitem__(self, index: int) -> dict:
        try:
            item = self.training_set[index]
        except UNREADABLE as error:
            return {"unreadable": index, "problem": unreadable_problem(self.training_set.cases[index], error)}
        if not torch.isfinite(item["image"]).all():  # a prepared volume overwritten with NaN: one skipped step per epoch otherwise
            case = self.training_set.cases[index]
            return {"unreadable": index, "problem": f"case {case.case_id}: {case.image_file} holds NaN or infinite values"}
        return item


def unreadable_problem(case: PreparedCase, error: Exception) -> str:
    """Name the case and the first of its cached files that no longer loads."""
    files = [path for path in (case.image_file, case.label_file, case.foreground_file) if path is not None]
    culprit, reason = next(((path, problem) for path in files if (problem := check_array(path))), ("its cache", None))
    if reason is None:  # numpy's own messages run on (and advise loading untrusted files with allow_pickle): first line only
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).split(". ")[0].splitlines()[0]
    return f"case {case.case_id}: {culprit} is unreadable ({reason})"


def collate_readable(items: list[dict]) -> dict:
    """Batch the readable items; list the unreadable ones apart, as (index, problem)."""
    readable = [item for item in items if "unreadable" not in item]
    batch = default_collate(readable) if readable else {"index": torch.empty(0, dtype=torch.long)}
    batch["unreadable"] = [(item["unreadable"], item["problem"]) for item in items if "unreadable" in item]
    return batch


def scored_roi(case: PreparedCase, config: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """The image and label window a case is judged on: its stored ROI, or for random-crop runs
    (which store the whole volume) the ROI centred on its label, so every score sees the same voxels."""
    image, label = case.load_image(), case.load_label()
    if config.crop != "random":
        return image, label
    start, size = roi_window(label, replace(config, crop="label"))
    return extract_window(image, start, size), extract_window(label, start, size)
