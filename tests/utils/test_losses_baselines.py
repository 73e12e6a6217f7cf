"""Loss terms of the baselines (SSL4MIS Dice and entropy, URPC) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from utils.losses import entropy_loss, kl_divergence_map, multiclass_dice_loss, uncertainty_rectified_consistency


def _two_class(foreground: list[float]) -> torch.Tensor:
    """(1, 2, 1, 1, N) probabilities with p_1 = ``foreground`` and p_0 = 1 - p_1."""
    p1 = torch.tensor(foreground).reshape(1, 1, 1, 1, -1)
    return torch.cat([1 - p1, p1], dim=1)


def test_multiclass_dice_averages_the_dice_of_every_class_background_included():
    prob = _two_class([1.0, 0.5, 0.0, 0.0])
    label = torch.tensor([1, 1, 0, 0]).reshape(1, 1, 1, 4)
    # class 1: sum(st) = 1.5, sum(s^2) = 1.25, sum(t^2) = 2; class 0: s = [0, .5, 1, 1], t = [0, 0, 1, 1]
    expected = ((1 - 3.0 / 3.25) + (1 - 4.0 / 4.25)) / 2
    assert multiclass_dice_loss(prob, label, smooth=0.0).item() == pytest.approx(expected, rel=1e-6)


def test_multiclass_dice_is_zero_for_a_perfect_prediction_with_an_absent_class():
    prob = _two_class([0.0, 0.0, 0.0])
    label = torch.zeros(1, 1, 1, 3, dtype=torch.long)
    assert multiclass_dice_loss(prob, label).item() == pytest.approx(0.0, abs=1e-7)


def test_multiclass_dice_refuses_a_label_with_a_class_axis():
    with pytest.raises(ValueError, match="without the class axis"):
        multiclass_dice_loss(_two_class([0.5]), torch.zeros(1, 2, 1, 1, 1, dtype=torch.long))


def test_entropy_loss_is_the_binary_entropy_in_bits():
    # H(0.25) = 0.811278 bits, the textbook value
    assert entropy_loss(_two_class([0.25, 0.75])).item() == pytest.approx(0.8112781, abs=1e-5)


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_entropy_loss_is_one_for_uniform_and_zero_for_one_hot_predictions(classes):
    uniform = torch.full((2, classes, 2, 2, 2), 1.0 / classes)
    one_hot = torch.zeros(2, classes, 2, 2, 2)
    one_hot[:, 0] = 1.0
    assert entropy_loss(uniform).item() == pytest.approx(1.0, abs=1e-5)
    assert entropy_loss(one_hot).item() == pytest.approx(0.0, abs=1e-5)


def test_entropy_loss_refuses_a_single_class():
    with pytest.raises(ValueError, match="C >= 2"):
        entropy_loss(torch.ones(1, 1, 2, 2, 2))


def test_kl_divergence_map_matches_hand_values_with_zero_log_zero():
    p = torch.tensor([[0.5, 1.0], [0.5, 0.0]]).reshape(1, 2, 1, 1, 2)
    q = torch.tensor([[0.25, 0.5], [0.75, 0.5]]).reshape(1, 2, 1, 1, 2)
    kl = kl_divergence_map(p, torch.log(q))
    assert kl.shape == (1, 1, 1, 1, 2)
    expected = [0.5 * math.log(2.0) + 0.5 * math.log(0.5 / 0.75), math.log(2.0)]
    torch.testing.assert_close(kl.flatten(), torch.tensor(expected))


def test_kl_divergence_map_equals_torch_kl_div_summed_over_classes():
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 3, 4, 4, 4, generator=gen), dim=1)
    log_q = torch.log_softmax(torch.randn(2, 3, 4, 4, 4, generator=gen), dim=1)
    expected = nn.KLDivLoss(reduction="none")(log_q, p).sum(dim=1, keepdim=True)
    torch.testing.assert_close(kl_divergence_map(p, log_q), expected)


def test_rectified_consistency_matches_a_hand_computed_two_voxel_case():
    prob = _two_class([0.2, 0.9])
    target = _two_class([0.6, 0.5])
    u = torch.tensor([0.0, math.log(2.0)]).reshape(1, 1, 1, 1, 2)  # weights exp(-U) = 1 and 1/2
    # squared gaps per voxel: 0.16 on both classes at voxel 1, 0.16 on both at voxel 2
    numerator = (0.16 * 1 + 0.16 * 0.5) * 2 / 4  # mean over (C=2) x (2 voxels)
    denominator = (1 + 0.5) / 2 + 1e-8
    expected = numerator / denominator + math.log(2.0) / 2
    assert uncertainty_rectified_consistency(prob, target, u).item() == pytest.approx(expected, rel=1e-6)


def test_rectified_consistency_refuses_an_uncertainty_with_class_channels():
    prob = _two_class([0.2])
    with pytest.raises(ValueError, match=r"\(B, 1, \.\.\.\)"):
        uncertainty_rectified_consistency(prob, prob, torch.zeros(1, 2, 1, 1, 1))
