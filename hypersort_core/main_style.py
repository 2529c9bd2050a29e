"""Each training case against the main style: how far its given label is from what the λ = 0 UNet draws.

The L1 penalty puts the main annotation style at λ = 0, and a case whose label the shared UNet cannot
fit is fitted through its own latent, away from 0; so the λ = 0 UNet has in effect been trained by the
main style's cases, unlike a plain UNet trained on every case, which learns the wrong labels too.
`hsort analyze` ranks the cases by this loss (analysis.RANKED_BY) and `hsort evaluate` judges it.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from hypersort_core.data import DataError, PreparedCase, scored_roi
from hypersort_core.loss import segmentation_loss
from hypersort_core.metrics import foreground_dice
from hypersort_core.run import Run


def prepared_training_cases(run: Run, progress: bool = False) -> dict[str, PreparedCase]:
    """The run's training cases as prepared for training, by case id."""
    prepared = {case.case_id: case for case in run.prepared(progress=progress).cases}
    missing = [case_id for case_id in run.case_ids if case_id not in prepared]
    if missing:
        raise DataError(run.data, f"no longer holds the training case(s) {', '.join(map(repr, missing[:5]))} of {run.run_dir}")
    return prepared


def main_style_fit(run: Run, prepared: dict[str, PreparedCase], progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """For each training case, its given label against the λ = 0 UNet on the case's prepared ROI: the
    segmentation loss (cross-entropy + soft Dice, training's loss without its latent term) and the
    foreground Dice of the prediction."""
    losses, dice = [], []
    for case_id in tqdm(run.case_ids, desc="λ = 0 predictions", unit="case", disable=not progress):
        image, label = scored_roi(prepared[case_id], run.config.preprocess)
        logits = run.logits(torch.from_numpy(np.array(image, dtype=np.float32))[None, None], main_style(run))
        target = torch.from_numpy(np.array(label, dtype=np.int64))[None].to(logits.device)
        losses.append(float(segmentation_loss(logits, target)[0]))
        dice.append(foreground_dice(logits[0].argmax(dim=0).cpu().numpy(), label, run.config.model.out_channels))
    return np.array(losses), np.array(dice)


def main_style(run: Run) -> np.ndarray:
    return np.zeros(run.config.model.latent_dim, dtype=np.float32)
