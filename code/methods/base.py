"""The interface every training method implements; the loop in ``engine/trainer.py`` is written once.

A method owns its loss (and a teacher, if it has one). The loop calls, per iteration::

    loss, logs = method.training_step(batch, step)
    optimizer.zero_grad(set_to_none=True); loss.backward(); optimizer.step()
    method.after_optimizer_step(step)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Batch", "Method"]


@dataclass
class Batch:
    """One training batch: the first ``labeled_bs`` rows are labelled, the rest unlabelled.

    Attributes:
        image: ``(B, C, D, H, W)`` float.
        label: ``(B, D, H, W)`` int64; rows ``labeled_bs:`` hold no usable label.
        labeled_bs: number of labelled rows at the start of the batch.
    """

    image: Tensor
    label: Tensor
    labeled_bs: int

    def to(self, device: torch.device) -> Batch:
        return Batch(self.image.to(device, non_blocking=True), self.label.to(device, non_blocking=True), self.labeled_bs)


class Method:
    """Base class: a student network and a loss over one batch.

    Args:
        student: the network being trained (its parameters are what the optimiser updates).
        cfg: the training configuration (``engine.config.TrainConfig``); methods read their
            hyper-parameters from it.
    """

    name = "base"
    uses_unlabeled = True

    def __init__(self, student: nn.Module, cfg: Any) -> None:
        self.student = student
        self.cfg = cfg

    def training_step(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Return the scalar loss to back-propagate and a dict of floats to log."""
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """Called after ``optimizer.step()`` (EMA teacher update etc.)."""

    def images_to_log(self) -> dict[str, Tensor]:
        """Optional ``(D, H, W)`` volumes from the last step to show in TensorBoard (e.g. uncertainty)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Extra state for an exact resume (the teacher's weights, ...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
