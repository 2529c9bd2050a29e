"""The misfit that ranks the cases: both losses of a label, and their running means over the epochs."""

import math

import numpy as np
import pytest
import torch

from hypersort_core.loss import segmentation_loss
from hypersort_core.misfit import LOSSES, RUNNING_SCORES, label_losses, misfit, update_running_means
from hypersort_core.model import HyperSORT, ModelConfig


@torch.no_grad()
def test_label_losses_judge_the_label_by_the_lambda0_unet_and_by_its_own_latent_s():
    torch.manual_seed(0)
    model = HyperSORT(ModelConfig(levels=1, convs_per_level=1, base_channels=4), ["a", "b"])
    image, label = torch.randn(1, 8, 8, 8), (torch.rand(8, 8, 8) > 0.6).long()
    latent = torch.tensor([0.7, -1.3])
    (at_zero, at_own), logits = label_losses(model, image, label, latent)
    for value, point in ((at_zero, torch.zeros(2)), (at_own, latent)):
        expected = segmentation_loss(model(image[None], point[None]), label[None])
        assert value == pytest.approx(float(expected[0]), rel=1e-5)
    torch.testing.assert_close(
        logits, model(image[None], torch.zeros(1, 2))[0], rtol=1e-4, atol=1e-4
    )  # one pass of two images against one of one: float32 sums in another order
    assert at_zero != pytest.approx(at_own)  # the two UNets differ


def test_the_running_means_are_plain_means_at_first_then_follow_the_recent_epochs():
    means = {name: [math.nan] * 2 for name in LOSSES}
    counts = [0, 0]
    values = np.arange(1, 3 * RUNNING_SCORES + 1, dtype=float)
    for value in values[:RUNNING_SCORES]:
        update_running_means(means, counts, {0: (value, 2 * value)})
    assert means["loss_lambda0"][0] == pytest.approx(values[:RUNNING_SCORES].mean())
    assert means["loss_own"][0] == pytest.approx(2 * values[:RUNNING_SCORES].mean())
    for value in values[RUNNING_SCORES:]:
        update_running_means(means, counts, {0: (value, 2 * value)})
    # An exponential mean over about RUNNING_SCORES scorings: it lags a steady rise by about that many.
    assert values[-1] - RUNNING_SCORES < means["loss_lambda0"][0] < values[-1] - RUNNING_SCORES / 2
    assert counts == [3 * RUNNING_SCORES, 0] and math.isnan(means["loss_own"][1])  # case 1 never scored (unreadable)


def test_the_misfit_is_high_only_where_both_losses_are():
    assert misfit(np.array([0.9, 0.9, 0.1, 0.4]), np.array([0.1, 0.9, 0.9, 0.4])) == pytest.approx([0.3, 0.9, 0.3, 0.4])
