"""Loss terms with C > 2 classes (issue #18) against hand-computed values; C = 2 stays the released term exactly."""

from __future__ import annotations

import math

import pytest
import torch

from utils.losses import cross_task_consistency, dice_loss, foreground_dice_loss

LN2, LN3 = math.log(2.0), math.log(3.0)


def _three_class_prob() -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, 1, 1, 4) probabilities and their (1, 1, 1, 4) labels [0, 1, 2, 2]."""
    prob = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],  # background
            [0.0, 1.0, 0.5, 0.0],  # class 1
            [0.0, 0.0, 0.5, 1.0],  # class 2
        ]
    ).reshape(1, 3, 1, 1, 4)
    return prob, torch.tensor([0, 1, 2, 2]).reshape(1, 1, 1, 4)


def test_foreground_dice_is_the_mean_over_classes_one_to_c_minus_one():
    prob, label = _three_class_prob()
    # class 1: sum(s t) = 1, sum(s^2) = 1.25, sum(t^2) = 1 -> 1 - 2 / 2.25 = 1/9
    # class 2: sum(s t) = 1.5, sum(s^2) = 1.25, sum(t^2) = 2 -> 1 - 3 / 3.25 = 1/13
    assert foreground_dice_loss(prob, label, smooth=0.0).item() == pytest.approx((1 / 9 + 1 / 13) / 2, rel=1e-6)
    with_smooth = (1 - (2 + 1e-5) / (2.25 + 1e-5) + 1 - (3 + 1e-5) / (3.25 + 1e-5)) / 2
    assert foreground_dice_loss(prob, label).item() == pytest.approx(with_smooth, rel=1e-6)


def test_foreground_dice_leaves_the_background_channel_out():
    prob, label = _three_class_prob()
    other = prob.clone()
    other[:, 0] = 0.3
    assert torch.equal(foreground_dice_loss(other, label), foreground_dice_loss(prob, label))


def test_foreground_dice_of_two_classes_is_the_released_class_one_term_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    prob = torch.softmax(3 * torch.randn(3, 2, 5, 6, 7, generator=gen), dim=1)
    label = torch.randint(0, 2, (3, 5, 6, 7), generator=gen)
    assert torch.equal(foreground_dice_loss(prob, label), dice_loss(prob[:, 1], label == 1))


def test_foreground_dice_refuses_one_class_and_a_mismatched_label():
    prob, label = _three_class_prob()
    with pytest.raises(ValueError, match="C >= 2"):
        foreground_dice_loss(prob[:, :1], label)
    with pytest.raises(ValueError, match="without the class axis"):
        foreground_dice_loss(prob, label[..., :2])


def test_cross_task_one_channel_sdf_is_compared_with_the_summed_foreground_probability_of_three_classes():
    # logits (ln 2, 0, 0): p = (1/2, 1/4, 1/4), foreground probability 1/2 at both voxels
    logits = torch.tensor([[LN2, LN2], [0.0, 0.0], [0.0, 0.0]]).reshape(1, 3, 1, 1, 2)
    # sigmoid(-1500 d): 0.5 for d = 0 (gap 0), 0.25 for d = ln 3 / 1500 (gap 1/4)
    sdf = torch.tensor([0.0, LN3 / 1500.0]).reshape(1, 1, 1, 1, 2)
    assert cross_task_consistency(sdf, logits).item() == pytest.approx((0.0 + 1 / 16) / 2, rel=1e-5)


def test_cross_task_with_c_channels_compares_every_class_channel():
    logits = torch.tensor([LN2, 0.0, 0.0]).reshape(1, 3, 1, 1, 1)  # p = (1/2, 1/4, 1/4)
    sdf = torch.zeros(1, 3, 1, 1, 1)  # mask 0.5 in every channel: gaps 0, 1/4, 1/4
    assert cross_task_consistency(sdf, logits).item() == pytest.approx((0 + 1 / 16 + 1 / 16) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        cross_task_consistency(torch.zeros(1, 2, 1, 1, 1), logits)
