"""The interface every training method implements; the loop in ``engine/trainer.py`` is written once.

A method owns its loss (and a teacher, if it has one). The loop calls, per iteration::

    loss, logs = method.training_step(batch, step)
    optimizer.zero_grad(set_to_none=True); loss.backward(); optimizer.step()
    method.after_optimizer_step(step)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor, nn

from utils.ema import create_ema_teacher, update_ema

if TYPE_CHECKING:
    from engine.config import TrainConfig

__all__ = ["Batch", "EMATeacherMethod", "Method", "Passes", "Term"]

Term = Union[Tensor, float]
"""One entry of an objective's dict of terms: a tensor, or a float such as the ramped weight."""


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


class Passes:
    """How a method runs the forwards whose order or size it may change; this plain one runs them as asked.

    In its low-memory order a method draws the student's random numbers before the teacher's passes
    (:meth:`reserve_randomness`) and runs a chunk of teacher passes as forwards of fewer rows
    (:meth:`forward_in_pieces`); both keep the random stream of the released order only where :meth:`can_reserve`
    is True. This plain one cannot reserve, so a method keeps the released order with it; ``speed.prepare_training``
    returns one that can for the U-Nets.
    """

    def around_teacher(self) -> AbstractContextManager[Any]:
        """A context manager entered around a training step's no-grad teacher passes."""
        return contextlib.nullcontext()

    def can_reserve(self, net: nn.Module) -> bool:
        """True if :meth:`reserve_randomness` and :meth:`forward_in_pieces` keep ``net``'s random stream."""
        return False

    def reserve_randomness(self, net: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> None:
        """Draw now the random numbers of ``net``'s next train-mode forward of ``input_shape``.

        Raises:
            ValueError: if :meth:`can_reserve` is False for ``net``.
        """
        raise ValueError(f"{type(self).__name__} cannot reserve the random numbers of {type(net).__name__}")

    def forward_in_pieces(self, net: nn.Module, x: Tensor, rows: int,
                          read: Callable[[Any], Tensor] | None = None) -> Any:
        """``read(net(x))`` (``net(x)`` without ``read``); a subclass may run it in pieces of ``rows`` rows."""
        out = net(x)
        return out if read is None else read(out)


class Method:
    """Base class: a student network and a loss over one batch.

    Args:
        student: the network being trained (its parameters are what the optimiser updates; the teacher copies it).
        cfg: the training configuration; methods read their hyper-parameters from it.
        passes: how the teacher's passes run (:class:`Passes`, the default, runs them as asked).
        forward: what the student's forward in :meth:`training_step` calls, e.g. a DistributedDataParallel wrapper
            of ``student``. Default: ``student`` itself.
    """

    name = "base"
    uses_unlabeled = True
    default_model = "unet_3D_dt"
    """The network ``--model`` defaults to for this method."""

    def __init__(self, student: nn.Module, cfg: TrainConfig, passes: Passes | None = None,
                 forward: nn.Module | None = None) -> None:
        self.check_config(cfg)
        self.student = student
        self.cfg = cfg
        self.passes = passes if passes is not None else Passes()
        self.run_student = forward if forward is not None else student

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        """Refuse options this method cannot train with; subclasses extend it (``engine.config.check_config``).

        This base checks the range of every numeric option (``engine.config.check_ranges``).

        Raises:
            ValueError: naming the option, its value and what was expected.
        """
        from engine.config import check_ranges  # engine.config reaches the methods only inside functions

        check_ranges(cfg)

    @classmethod
    def model_for(cls, cfg: TrainConfig) -> str:
        """The network this method trains when ``--model`` is not given."""
        return cls.default_model

    def networks(self) -> list[nn.Module]:
        """The networks whose forwards a step runs (the student, and the teacher if there is one)."""
        return [self.student]

    def stage(self, step: int) -> str:
        """The name of the training stage that 0-based iteration ``step`` belongs to (one stage: ``"train"``).

        A method of several stages (pre-training, then self-training) names them; the trainer saves the student
        as ``<model>_<stage>_model.pth`` when a stage ends.
        """
        return "train"

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
        student, cfg, passes, forward: as :class:`Method`; reads ``ema_decay``, ``noise_std`` and ``noise_clip``.
        generator: optional RNG for the teacher's input noise (default: the global RNG).
    """

    def __init__(self, student: nn.Module, cfg: TrainConfig, passes: Passes | None = None,
                 forward: nn.Module | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__(student, cfg, passes, forward)
        self.generator = generator
        self.teacher = create_ema_teacher(student)
        self.teacher.train()

    def networks(self) -> list[nn.Module]:
        return [self.student, self.teacher]

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
