import torch

from hypersort_core.loss import hypersort_loss, soft_dice_loss


def one_hot_logits(label: torch.Tensor, classes: int, scale: float = 50.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(label, classes).movedim(-1, 1).float() * scale


def test_dice_is_zero_for_a_perfect_prediction_and_one_for_a_disjoint_one():
    label = torch.zeros(2, 6, 6, 6, dtype=torch.long)
    label[:, 2:4, 2:4, 2:4] = 1
    assert soft_dice_loss(one_hot_logits(label, 2), label).max() < 1e-6
    assert torch.allclose(soft_dice_loss(one_hot_logits(1 - label, 2), label), torch.ones(2), atol=1e-6)


def test_dice_ignores_the_background():
    label = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    label[:, 3:5, 3:5, 3:5] = 1
    all_background = one_hot_logits(torch.zeros_like(label), 2)  # background Dice ~0.98, foreground 0
    assert soft_dice_loss(all_background, label) > 0.99


def test_dice_averages_the_foreground_classes():
    label = torch.zeros(1, 6, 6, 6, dtype=torch.long)
    label[:, :2], label[:, 4:] = 1, 2
    half_right = one_hot_logits(torch.where(label == 2, 0, label), 3)  # class 1 perfect, class 2 missed
    assert torch.isclose(soft_dice_loss(half_right, label), torch.tensor([0.5]), atol=1e-4)


def test_dice_is_per_sample():
    label = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    label[0, :2] = 1
    logits = one_hot_logits(label, 2)
    logits[1] = one_hot_logits(1 - label[1:2], 2)[0]
    per_sample = soft_dice_loss(logits, label)
    assert per_sample[0] < 1e-6 and per_sample[1] > 0.4


def test_total_is_ce_plus_dice_plus_weighted_batch_mean_l1():
    torch.manual_seed(0)
    logits, label = torch.randn(3, 2, 4, 4, 4), torch.randint(0, 2, (3, 4, 4, 4))
    latent = torch.tensor([[1.0, -2.0], [0.5, 0.5], [0.0, 0.0]], requires_grad=True)
    terms = hypersort_loss(logits, label, latent, l1_weight=0.5)
    assert torch.isclose(terms.latent_l1, torch.tensor(4.0 / 3))
    assert torch.isclose(terms.total, terms.cross_entropy + terms.dice + 0.5 * terms.latent_l1)
    terms.total.backward()
    assert torch.allclose(latent.grad[0], torch.tensor([0.5, -0.5]) / 3)  # the L1 pulls each latent towards 0
