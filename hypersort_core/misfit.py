"""Misfit: how badly a case's label is fitted, by the main style's UNet and by the case's own.

Two losses (cross-entropy + soft Dice, training's loss without its latent term) judge each label on
its scored ROI:
- under the λ = 0 UNet, the main style's: the L1 penalty keeps a wrong label's case away from 0,
  so this UNet has in effect been trained by the main style's cases and finds labels drawn too
  tight or too loose, or cut short, that a case's latent has learned to follow;
- under the UNet of the case's own latent: what the hyper-network cannot draw for any latent
  stays unfitted there, such as a leak into the tissue beside the organ, a neighbouring structure,
  holes or a misaligned label.
A label the main style draws differently and its own latent cannot explain either is suspicious on
both; `misfit`, their geometric mean, ranks the cases (analysis.RANKED_BY).

One epoch's UNet is a noisy judge: on the curation benchmark the ranking of a single epoch's λ = 0
loss swung from 0.89 to 0.96 AUROC between neighbouring epochs.  So training scores every case every
SCORE_EVERY epochs and at the last, and keeps running means (the plain mean of the first RUNNING_SCORES
scorings, then an exponential mean over about that many), which analysis reads; a run without them
(trained by an earlier version, or imported from the reference code) is judged by its final UNets.
A scoring is two forward passes a case; scoring every second epoch made the benchmark's runs a fifth
to a third longer on the CPU, and scoring every epoch ranked no better.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from hypersort_core.data import UNREADABLE, PreparedCase, PreprocessConfig, scored_roi
from hypersort_core.loss import segmentation_loss
from hypersort_core.model import HyperSORT

LOSSES = ("loss_lambda0", "loss_own")  # under the λ = 0 UNet, under the case's own latent's UNet
SCORE_EVERY = 2  # epochs
RUNNING_SCORES = 10  # the running means follow about the last 20 epochs; chosen on the curation benchmark (bench/README.md)


@torch.no_grad()
def label_losses(model: HyperSORT, image: torch.Tensor, label: torch.Tensor, latent: torch.Tensor) -> tuple[tuple[float, float], torch.Tensor]:
    """The loss of one label [*roi] for its image [1, *roi] under the λ = 0 UNet and under its latent [d]'s
    (one forward pass), and the λ = 0 UNet's logits [C, *roi]."""
    latents = torch.stack([torch.zeros_like(latent), latent])
    logits = model(image[None].expand(2, *image.shape), latents).float()
    losses = segmentation_loss(logits, label[None].expand(2, *label.shape))
    return (float(losses[0]), float(losses[1])), logits[0]


def case_losses(
    model: HyperSORT, cases: Iterable[tuple[int, PreparedCase]], config: PreprocessConfig, device: torch.device, autocast
) -> dict[int, tuple[float, float]]:
    """label_losses of the given (index, case) pairs, each on its scored ROI, by case index; a case whose
    prepared arrays cannot be read is left out."""
    losses = {}
    for index, case in cases:
        try:
            image, label = scored_tensors(case, config, device)
        except UNREADABLE:
            continue
        with autocast:
            losses[index] = label_losses(model, image, label, model.latents.weight[index].detach())[0]
    return losses


def scored_tensors(case: PreparedCase, config: PreprocessConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A case's scored ROI (data.scored_roi) as the image [1, *roi] and label [*roi] a UNet takes."""
    image, label = scored_roi(case, config)
    return torch.from_numpy(np.array(image, dtype=np.float32))[None].to(device), torch.from_numpy(np.array(label, dtype=np.int64)).to(device)


def update_running_means(means: dict[str, list[float]], counts: list[int], losses: dict[int, tuple[float, float]]) -> None:
    """Fold one scoring's losses (by case index) into the running means, in place; counts: the scorings of each case so far."""
    for index, values in losses.items():
        counts[index] += 1
        weight = 1 / min(counts[index], RUNNING_SCORES)
        for name, value in zip(LOSSES, values):
            old = means[name][index]
            means[name][index] = value if counts[index] == 1 else old + weight * (value - old)


def misfit(loss_lambda0: np.ndarray, loss_own: np.ndarray) -> np.ndarray:
    """The geometric mean of the two losses: high only where neither the main style nor the case's own latent fits the label."""
    return np.sqrt(np.asarray(loss_lambda0) * np.asarray(loss_own))
