"""Ramp schedules against hand-computed values."""

from __future__ import annotations

import math

import pytest

from utils.ramps import consistency_weight, cosine_rampdown, cosine_rampup, linear_rampup, sigmoid_rampup


@pytest.mark.parametrize(
    ("current", "length", "expected"),
    [
        (0, 200, 0.006737946999085467),  # exp(-5)
        (100, 200, 0.28650479686019015),  # exp(-5 * 0.5^2) = exp(-1.25)
        (150, 200, 0.7316156289466418),  # exp(-5 * 0.25^2) = exp(-0.3125)
        (200, 200, 1.0),
        (350, 200, 1.0),  # clipped above
        (-20, 200, 0.006737946999085467),  # clipped below
        (7, 0, 1.0),  # no ramp
    ],
)
def test_sigmoid_rampup_matches_hand_values(current, length, expected):
    assert sigmoid_rampup(current, length) == pytest.approx(expected, rel=1e-12)


def test_linear_rampup_is_clipped_fraction():
    assert linear_rampup(50, 200) == 0.25
    assert linear_rampup(0, 200) == 0.0
    assert linear_rampup(500, 200) == 1.0
    assert linear_rampup(-3, 200) == 0.0
    assert linear_rampup(3, 0) == 1.0


def test_cosine_ramps_are_half_cosines():
    assert cosine_rampdown(0, 10) == pytest.approx(1.0)
    assert cosine_rampdown(5, 10) == pytest.approx(0.5)
    assert cosine_rampdown(10, 10) == pytest.approx(0.0, abs=1e-15)
    assert cosine_rampdown(12, 10) == pytest.approx(0.0, abs=1e-15)
    assert cosine_rampdown(1, 0) == 0.0
    assert cosine_rampup(2.5, 10) == pytest.approx(0.5 * (1 - math.sqrt(0.5)))  # 0.5 (1 - cos(pi / 4))
    assert cosine_rampup(10, 10) == pytest.approx(1.0)
    assert cosine_rampup(1, 0) == 1.0


def test_consistency_weight_steps_once_per_interval_and_reaches_its_maximum_at_30000():
    assert consistency_weight(0) == pytest.approx(0.1 * math.exp(-5), rel=1e-12)
    assert consistency_weight(149) == consistency_weight(0)
    assert consistency_weight(150) == pytest.approx(0.1 * math.exp(-5 * (199 / 200) ** 2), rel=1e-12)
    assert consistency_weight(29999) == pytest.approx(0.1 * math.exp(-5 / 200**2), rel=1e-12)
    assert consistency_weight(30000) == pytest.approx(0.1, rel=1e-12)
    assert consistency_weight(10, consistency=2.0, rampup_length=10, interval=1) == pytest.approx(2.0)


def test_negative_lengths_and_zero_interval_are_refused():
    with pytest.raises(ValueError, match="rampup_length"):
        sigmoid_rampup(1, -1)
    with pytest.raises(ValueError, match="rampup_length"):
        linear_rampup(1, -1)
    with pytest.raises(ValueError, match="rampdown_length"):
        cosine_rampdown(1, -1)
    with pytest.raises(ValueError, match="interval"):
        consistency_weight(1, interval=0)
