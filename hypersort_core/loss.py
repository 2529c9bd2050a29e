"""HyperSORT's objective: cross-entropy + soft Dice per sample, plus an L1 pull of each latent to 0.

The L1 term is what makes the main annotation style sit at lambda = 0, so that
odd labels are the ones far from the origin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DICE_EPS = 1e-8


@dataclass
class LossTerms:
    total: torch.Tensor
    cross_entropy: torch.Tensor
    dice: torch.Tensor
    latent_l1: torch.Tensor


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice per sample [B], averaged over the foreground classes.

    Background is left out (as nnU-Net does): its Dice is near 1 whatever the boundary does, so
    keeping it halves the weight of exactly the boundary errors that tell annotation styles apart.
    """
    probs = logits.float().softmax(dim=1)[:, 1:]
    one_hot = F.one_hot(target, num_classes=logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
    axes = tuple(range(2, logits.dim()))
    overlap = (probs * one_hot).sum(axes)
    sizes = probs.sum(axes) + one_hot.sum(axes)
    return 1 - (2 * overlap / (sizes + DICE_EPS)).mean(dim=1)


def hypersort_loss(logits: torch.Tensor, target: torch.Tensor, latent: torch.Tensor, l1_weight: float) -> LossTerms:
    """Batch mean of CE + Dice + l1_weight * ||lambda||_1 (each sample weighs the same as in batch-1 training)."""
    cross_entropy = F.cross_entropy(logits.float(), target)
    dice = soft_dice_loss(logits, target).mean()
    latent_l1 = latent.abs().sum(dim=1).mean()
    return LossTerms(cross_entropy + dice + l1_weight * latent_l1, cross_entropy, dice, latent_l1)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice per sample [B]: HyperSORT's loss without its latent term, which the
    baselines train with and the λ = 0 score judges a label by."""
    cross_entropy = F.cross_entropy(logits.float(), target, reduction="none").flatten(1).mean(dim=1)
    return cross_entropy + soft_dice_loss(logits, target)
