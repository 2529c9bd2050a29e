"""How close two segmentations are: shared by the analysis, the evaluation and the corrections."""

from __future__ import annotations

import numpy as np


def foreground_dice(prediction: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    """Hard Dice averaged over the foreground classes; a class absent from both counts as 1 (nothing to miss)."""
    scores = []
    for number in range(1, num_classes):
        predicted, labelled = prediction == number, label == number
        total = int(predicted.sum() + labelled.sum())
        scores.append(1.0 if total == 0 else 2 * int(np.logical_and(predicted, labelled).sum()) / total)
    return float(np.mean(scores))
