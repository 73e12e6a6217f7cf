"""Ramp-up and ramp-down schedules for consistency weights and thresholds (Laine & Aila 2017, Tarvainen 2017).

Every ramp maps an iteration (or epoch) counter ``current`` and a length ``L`` to a factor in ``[0, 1]``;
``current`` is clipped to ``[0, L]`` first, so calling past the end keeps the end value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "ConsistencyRamp",
    "consistency_weight",
    "cosine_rampdown",
    "cosine_rampup",
    "linear_rampup",
    "sigmoid_rampup",
]


def _check_length(length: float, name: str) -> None:
    if length < 0:
        raise ValueError(f"{name} must be >= 0, but found {length}")


def sigmoid_rampup(current: float, rampup_length: float) -> float:
    """Exponential ("sigmoid-shaped") ramp-up from ``exp(-5)`` to 1.

    .. math:: r(t, L) = \\exp(-5 (1 - \\mathrm{clip}(t, 0, L) / L)^2), \\qquad r(t, 0) = 1

    Args:
        current: the counter t (iteration, or ``iteration // interval`` for the UG-MCL weight).
        rampup_length: L; 0 means no ramp (always 1.0).
    Raises:
        ValueError: if ``rampup_length`` is negative.
    """
    _check_length(rampup_length, "rampup_length")
    if rampup_length == 0:
        return 1.0
    phase = 1.0 - min(max(float(current), 0.0), float(rampup_length)) / rampup_length
    return float(math.exp(-5.0 * phase * phase))


def linear_rampup(current: float, rampup_length: float) -> float:
    """Linear ramp-up ``clip(t / L, 0, 1)``; 1.0 when ``L == 0``.

    Raises:
        ValueError: if ``rampup_length`` is negative.
    """
    _check_length(rampup_length, "rampup_length")
    if rampup_length == 0:
        return 1.0
    return min(max(float(current), 0.0), float(rampup_length)) / rampup_length


def cosine_rampdown(current: float, rampdown_length: float) -> float:
    """Cosine ramp-down from 1 to 0: ``0.5 (cos(pi clip(t, 0, L) / L) + 1)``; 0.0 when ``L == 0`` (already down).

    Raises:
        ValueError: if ``rampdown_length`` is negative.
    """
    _check_length(rampdown_length, "rampdown_length")
    if rampdown_length == 0:
        return 0.0
    t = min(max(float(current), 0.0), float(rampdown_length))
    return 0.5 * (math.cos(math.pi * t / rampdown_length) + 1.0)


def cosine_rampup(current: float, rampup_length: float) -> float:
    """Cosine ramp-up from 0 to 1: ``0.5 (1 - cos(pi clip(t, 0, L) / L))`` = ``1 - cosine_rampdown``; 1.0 when L == 0.

    Raises:
        ValueError: if ``rampup_length`` is negative.
    """
    return 1.0 - cosine_rampdown(current, rampup_length)


def consistency_weight(step: int, consistency: float = 0.1, rampup_length: float = 200.0, interval: int = 150) -> float:
    """The UA-MT / UG-MCL consistency weight ``w(t) = consistency * sigmoid_rampup(t // interval, L)``.

    With the released defaults (0.1, 200, 150) the weight reaches 0.1 at iteration 200 * 150 = 30,000,
    whatever ``max_iterations`` is (the original ties this ramp to 30,000 iterations; the threshold ramp
    follows ``max_iterations`` instead).

    Args:
        step: the iteration t (0-based).
        consistency: the final weight.
        rampup_length: L, in units of ``interval`` iterations.
        interval: the ramp advances once every ``interval`` iterations; 1 means every iteration.
    Raises:
        ValueError: if ``interval`` < 1 or ``rampup_length`` < 0.
    """
    if interval < 1:
        raise ValueError(f"interval must be >= 1, but found {interval}")
    return consistency * sigmoid_rampup(step // interval, rampup_length)


@dataclass(frozen=True)
class ConsistencyRamp:
    """The options of the consistency weight ramp w(t) that the training methods share (see :func:`consistency_weight`).

    Attributes:
        consistency: the final weight (``--consistency``, 0.1).
        rampup: L, in units of ``interval`` iterations (``--consistency_rampup``, 200).
        interval: iterations per ramp step (``--consistency_interval``, 150).
    """

    consistency: float = 0.1
    rampup: float = 200.0
    interval: int = 150

    def weight(self, step: int) -> float:
        """``w(t) = consistency * sigmoid_rampup(t // interval, rampup)``.

        Raises:
            ValueError: if ``interval`` < 1 or ``rampup`` < 0.
        """
        return consistency_weight(step, self.consistency, self.rampup, self.interval)
