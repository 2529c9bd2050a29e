"""Two ways to flag a wrong label without a hyper-network, for the paper's Section 4.2 comparison.

Both ask how badly one ordinary UNet fits a case's label: a label unlike the others is hard to
learn (the training loss after training on every case) and disagrees with what the other cases
teach (Test-Dice: the Dice loss of a UNet that never saw the case, rotating K folds). They use the
run's architecture, preprocessing, per-sample loss, optimiser, learning rate and batch size, so
the hyper-network is the only difference from HyperSORT.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from hypersort_core.config import ConfigError, TrainConfig
from hypersort_core.data import PreparedCase, PreparedData, TrainingSet, scored_roi
from hypersort_core.device import autocast_for
from hypersort_core.loss import segmentation_loss, soft_dice_loss
from hypersort_core.model import plain_unet
from hypersort_core.unet import UNet

CaseLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def train_plain_unet(cases: Dataset, config: TrainConfig, epochs: int, device: torch.device, description: str = "plain UNet", progress: bool = False) -> UNet:
    """Adam at the run's learning rate on mean per-sample loss, the run's batch size, seeded by the run's seed."""
    torch.manual_seed(config.seed)
    unet = plain_unet(config.model).to(device).train()
    optimizer = torch.optim.Adam(unet.parameters(), lr=config.lr)
    loader = DataLoader(cases, batch_size=config.batch_size, shuffle=True, num_workers=config.workers)
    autocast = autocast_for(config.precision, device)
    for _ in tqdm(range(epochs), desc=description, unit="epoch", disable=not progress, leave=False):
        for batch in loader:
            with autocast:
                logits = unet(batch["image"].to(device))
            loss = segmentation_loss(logits, batch["label"].to(device)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return unet.eval()


@torch.no_grad()
def case_losses(unet: UNet, cases: list[PreparedCase], config: TrainConfig, loss: CaseLoss, device: torch.device) -> np.ndarray:
    """loss(prediction, label) of each case on its scored ROI."""
    autocast = autocast_for(config.precision, device)
    values = []
    for case in cases:
        image, label = scored_roi(case, config.preprocess)
        with autocast:
            logits = unet(torch.from_numpy(np.array(image, dtype=np.float32))[None, None].to(device))
        values.append(float(loss(logits, torch.from_numpy(np.array(label, dtype=np.int64))[None].to(device))[0]))
    return np.array(values)


def training_loss_scores(prepared: PreparedData, config: TrainConfig, epochs: int, device: torch.device, progress: bool = False) -> np.ndarray:
    """Per case, the segmentation loss of a plain UNet trained on all cases (high = hard to learn)."""
    unet = train_plain_unet(TrainingSet(prepared, config.augmentation()), config, epochs, device, "plain UNet on all cases", progress)
    return case_losses(unet, prepared.cases, config, segmentation_loss, device)


def fold_of_each_case(n_cases: int, folds: int, seed: int) -> np.ndarray:
    """A fold number 0..folds-1 per case: a seeded shuffle cut into folds whose sizes differ by at most one."""
    if not 2 <= folds <= n_cases:
        raise ConfigError(f"Test-Dice needs between 2 and {n_cases} folds (one per case at most), got {folds}")
    order = np.random.default_rng(seed).permutation(n_cases)
    fold = np.empty(n_cases, dtype=int)
    for number, members in enumerate(np.array_split(order, folds)):
        fold[members] = number
    return fold


def held_out_dice_scores(prepared: PreparedData, config: TrainConfig, epochs: int, folds: int, device: torch.device, progress: bool = False) -> np.ndarray:
    """The paper's Test-Dice: per case, the soft Dice loss of a plain UNet trained on the other folds (high = disagrees with the rest)."""
    fold = fold_of_each_case(len(prepared.cases), folds, config.seed)
    training_set = TrainingSet(prepared, config.augmentation())
    scores = np.empty(len(fold))
    for number in range(folds):
        held_out = np.flatnonzero(fold == number)
        training_part = Subset(training_set, np.flatnonzero(fold != number).tolist())
        unet = train_plain_unet(training_part, config, epochs, device, f"Test-Dice fold {number + 1}/{folds}", progress)
        scores[held_out] = case_losses(unet, [prepared.cases[i] for i in held_out], config, soft_dice_loss, device)
    return scores
