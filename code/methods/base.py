"""The interface every training method implements; the loop in ``engine/trainer.py`` is written once.

A method owns its loss (and a teacher, if it has one). The loop calls, per iteration::

    loss, logs = method.training_step(batch, step)
    optimizer.zero_grad(set_to_none=True); loss.backward(); optimizer.step()
    method.after_optimizer_step(step)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from utils.ema import create_ema_teacher, update_ema

__all__ = ["Batch", "EMATeacherMethod", "Method"]


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


class EMATeacherMethod(Method):
    """A method with an EMA (mean) teacher fed noisy inputs: what Mean Teacher, UA-MT and UG-MCL share.

    The teacher is a copy of the student, kept in train mode (dropout on, as released), following the batch's
    device, updated by EMA after each optimiser step and saved for an exact resume. Subclasses check their options
    before calling this constructor, so an invalid configuration fails before the copy.

    Args:
        student: the network being trained.
        cfg: the training configuration; reads ``ema_decay``, ``noise_std`` and ``noise_clip``.
        generator: optional RNG for the teacher's input noise (default: the global RNG).

    Attributes:
        around_teacher_passes: called with no arguments for a context manager that each step enters around its
            teacher's no-grad passes. Default ``contextlib.nullcontext``; the trainer sets
            ``utils.allocator.keeping_freed_memory`` on CPU with ``--keep_freed_memory 2``.
    """

    def __init__(self, student: nn.Module, cfg: Any, generator: torch.Generator | None = None) -> None:
        super().__init__(student, cfg)
        self.generator = generator
        self.teacher = create_ema_teacher(student)
        self.teacher.train()
        self.around_teacher_passes: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext

    def _noisy(self, image: Tensor) -> Tensor:
        """x + clamp(sigma * N(0, 1), -c, c)."""
        device = self.generator.device if self.generator is not None else image.device
        noise = torch.randn(image.shape, generator=self.generator, device=device, dtype=image.dtype).to(image.device)
        return image + torch.clamp(noise * self.cfg.noise_std, -self.cfg.noise_clip, self.cfg.noise_clip)

    def _prepare_teacher(self, image: Tensor) -> None:
        """Follow the batch's device (if the student moved after construction); keep dropout on."""
        param = next(self.teacher.parameters(), None)
        if param is not None and param.device != image.device:
            self.teacher.to(image.device)
        self.teacher.train()

    def after_optimizer_step(self, step: int) -> None:
        """EMA update of the teacher: alpha = min(1 - 1/(step + 1), ema_decay)."""
        update_ema(self.teacher, self.student, step, self.cfg.ema_decay)

    def state_dict(self) -> dict[str, Any]:
        """``{"teacher": teacher.state_dict()}``."""
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the teacher saved by :meth:`state_dict`.

        Raises:
            KeyError: if ``state`` holds no ``"teacher"`` entry.
        """
        if "teacher" not in state:
            raise KeyError(f"{self.name} state needs a 'teacher' entry, but found keys {sorted(state)}")
        self.teacher.load_state_dict(state["teacher"])
