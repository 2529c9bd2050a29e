"""Each training case against the main style: how far its given label is from what the λ = 0 UNet draws.

The L1 penalty puts the main annotation style at λ = 0, and a case whose label the shared UNet cannot
fit is fitted through its own latent, away from 0; so the λ = 0 UNet has in effect been trained by the
main style's cases, unlike a plain UNet trained on every case, which learns the wrong labels too.
`hsort analyze` ranks the cases by the misfit of this loss and the one under the case's own latent
(misfit.py), and `hsort evaluate` judges both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from hypersort_core.data import DataError, PreparedCase
from hypersort_core.device import autocast_for
from hypersort_core.metrics import foreground_dice
from hypersort_core.misfit import label_losses, misfit, scored_tensors
from hypersort_core.run import Run


def prepared_training_cases(run: Run, progress: bool = False) -> dict[str, PreparedCase]:
    """The run's training cases as prepared for training, by case id."""
    prepared = {case.case_id: case for case in run.prepared(progress=progress).cases}
    missing = [case_id for case_id in run.case_ids if case_id not in prepared]
    if missing:
        raise DataError(run.data, f"no longer holds the training case(s) {', '.join(map(repr, missing[:5]))} of {run.run_dir}")
    return prepared


@dataclass
class MainStyleFit:
    """Each training case's given label under its run's final UNets (misfit.py says why both)."""

    loss_lambda0: np.ndarray  # [N] under the λ = 0 UNet
    loss_own: np.ndarray  # [N] under the UNet of the case's own latent
    dice: np.ndarray  # [N] foreground Dice between the label and the λ = 0 prediction


def main_style_fit(run: Run, prepared: dict[str, PreparedCase], progress: bool = False) -> MainStyleFit:
    """For each training case, its given label on the case's prepared ROI against the λ = 0 UNet and
    its own latent's: the segmentation losses (cross-entropy + soft Dice, training's loss without its
    latent term), and the foreground Dice of the λ = 0 prediction."""
    losses, dice = [], []
    for case_id, latent in tqdm(zip(run.case_ids, run.latents), total=len(run.case_ids), desc="λ = 0 predictions", unit="case", disable=not progress):
        image, label = scored_tensors(prepared[case_id], run.config.preprocess, run.device)
        with autocast_for(run.config.precision, run.device):
            pair, logits = label_losses(run.model, image, label, torch.from_numpy(latent).to(run.device))
        losses.append(pair)
        dice.append(foreground_dice(logits.argmax(dim=0).cpu().numpy(), label.cpu().numpy(), run.config.model.out_channels))
    loss_lambda0, loss_own = np.array(losses, dtype=float).reshape(-1, 2).T
    return MainStyleFit(loss_lambda0, loss_own, np.array(dice))


def run_misfit(run: Run, fit: MainStyleFit) -> np.ndarray:
    """The misfit from the running means training kept, each case's final-UNet losses where there are none."""
    running = run.running_losses
    loss_lambda0 = np.where(np.isnan(running["loss_lambda0"]), fit.loss_lambda0, running["loss_lambda0"])
    loss_own = np.where(np.isnan(running["loss_own"]), fit.loss_own, running["loss_own"])
    return misfit(loss_lambda0, loss_own)


def main_style(run: Run) -> np.ndarray:
    return np.zeros(run.config.model.latent_dim, dtype=np.float32)
