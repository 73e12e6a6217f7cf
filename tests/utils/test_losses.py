"""Loss terms against hand-computed values on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from utils.losses import (
    ce_loss,
    cross_task_consistency,
    dice_loss,
    masked_consistency,
    sdf_regression_loss,
    sdf_to_mask,
    softmax_mse,
)

LN3 = math.log(3.0)


def _logits(*pairs: tuple[float, float]) -> torch.Tensor:
    """(1, 2, 1, 1, N) logits from N (z0, z1) pairs."""
    return torch.tensor(pairs, dtype=torch.float32).T.reshape(1, 2, 1, 1, len(pairs))


def test_dice_loss_matches_hand_value():
    score = torch.tensor([[1.0, 0.5, 0.0, 0.0]])
    target = torch.tensor([[1, 1, 0, 0]])
    # sum(s t) = 1.5, sum(s^2) = 1.25, sum(t^2) = 2
    assert dice_loss(score, target, smooth=0.0).item() == pytest.approx(1 - 3.0 / 3.25, rel=1e-6)
    assert dice_loss(score, target).item() == pytest.approx(1 - (3.0 + 1e-5) / (3.25 + 1e-5), rel=1e-6)


def test_dice_loss_pools_the_whole_batch_instead_of_averaging_samples():
    score = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    target = torch.tensor([[1, 0], [1, 0]])
    # pooled: 1 - 2 / (1 + 2) = 1/3; the per-sample mean would be (0 + 1) / 2
    assert dice_loss(score, target, smooth=0.0).item() == pytest.approx(1 / 3, rel=1e-6)


def test_dice_loss_of_empty_target_and_empty_score_is_zero():
    assert dice_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


def test_ce_loss_is_mean_negative_log_likelihood():
    logits = _logits((0.0, LN3), (0.0, LN3))  # p = (1/4, 3/4) at both voxels
    target = torch.tensor([1, 0]).reshape(1, 1, 1, 2)
    expected = (-math.log(0.75) - math.log(0.25)) / 2
    assert ce_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_sdf_to_mask_is_sigmoid_of_minus_k_d():
    d = torch.tensor([0.0, LN3 / 1500.0, -LN3 / 1500.0])
    torch.testing.assert_close(sdf_to_mask(d), torch.tensor([0.5, 0.25, 0.75]))
    torch.testing.assert_close(sdf_to_mask(torch.tensor([LN3]), k=1.0), torch.tensor([0.25]))


def test_softmax_mse_is_elementwise_squared_probability_gap():
    student = _logits((0.0, 0.0), (5.0, 5.0))  # p = (1/2, 1/2)
    teacher = _logits((0.0, LN3), (5.0, 5.0))  # q = (1/4, 3/4), then (1/2, 1/2)
    expected = torch.tensor([[0.0625, 0.0], [0.0625, 0.0]]).reshape(1, 2, 1, 1, 2)
    torch.testing.assert_close(softmax_mse(student, teacher), expected)


def test_masked_consistency_uses_the_released_normalisation():
    dist = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).reshape(1, 2, 1, 1, 3)
    mask = torch.tensor([1.0, 0.0, 1.0]).reshape(1, 1, 1, 1, 3)
    # (1 + 3 + 4 + 6) / (2 * 2)
    assert masked_consistency(dist, mask).item() == pytest.approx(14 / 4)
    # a per-channel mask counts each kept element once: (1 + 6) / 2
    full_mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).reshape(1, 2, 1, 1, 3)
    assert masked_consistency(dist, full_mask).item() == pytest.approx(7 / 2)
    assert masked_consistency(dist, torch.zeros_like(mask)).item() == 0.0


def test_cross_task_consistency_matches_hand_value():
    sdf = torch.tensor([-1.0, 1.0]).reshape(1, 2, 1, 1, 1)  # masks ~ (1, 0)
    logits = _logits((0.0, LN3))  # p = (1/4, 3/4)
    expected = ((1 - 0.25) ** 2 + (0 - 0.75) ** 2) / 2
    assert cross_task_consistency(sdf, logits).item() == pytest.approx(expected, rel=1e-6)


def test_cross_task_consistency_compares_a_one_channel_sdf_with_the_foreground():
    sdf = torch.tensor([-1.0, 1.0]).reshape(1, 1, 1, 1, 2)  # masks ~ (1, 0)
    logits = _logits((0.0, LN3), (0.0, 0.0))  # foreground p = 3/4, 1/2
    expected = ((1 - 0.75) ** 2 + (0 - 0.5) ** 2) / 2
    assert cross_task_consistency(sdf, logits).item() == pytest.approx(expected, rel=1e-6)


def test_sdf_regression_loss_is_mse():
    assert sdf_regression_loss(torch.tensor([0.0, 1.0, -1.0]), torch.tensor([1.0, 1.0, 1.0])).item() == (
        pytest.approx(5 / 3)
    )


def test_mismatched_shapes_raise_value_error():
    a, b = torch.zeros(1, 2, 2, 2, 2), torch.zeros(1, 2, 2, 2, 3)
    with pytest.raises(ValueError, match="same shape"):
        dice_loss(a, b)
    with pytest.raises(ValueError, match="without the class axis"):
        ce_loss(a, torch.zeros(1, 2, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="same shape"):
        softmax_mse(a, b)
    with pytest.raises(ValueError, match="mask"):
        masked_consistency(a, torch.zeros(1, 1, 2, 2, 3))
    with pytest.raises(ValueError, match="mask"):
        masked_consistency(a, torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="same shape"):
        cross_task_consistency(a, b)
    with pytest.raises(ValueError, match="same shape"):
        sdf_regression_loss(a, b)
