"""Exponential moving average (EMA) teacher of Mean Teacher (Tarvainen & Valpola 2017), as in UA-MT / UG-MCL.

    alpha_t = min(1 - 1 / (t + 1), decay)
    theta'_t = alpha_t * theta'_{t-1} + (1 - alpha_t) * theta_t

At t = 0, alpha = 0 and the teacher becomes a copy of the student; the early small alphas let the teacher
follow the fast-changing student before the average settles at ``decay``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["create_ema_teacher", "update_ema"]


def create_ema_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of ``student`` whose parameters do not require gradients (the optimiser never sees them).

    The copy keeps the student's device, dtype and train/eval mode.
    """
    teacher = copy.deepcopy(student)
    for param in teacher.parameters():
        param.detach_()
        param.requires_grad_(False)
    return teacher


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, step: int, decay: float = 0.99) -> float:
    """Move the teacher's parameters towards the student's; copy the student's buffers.

        alpha = min(1 - 1 / (step + 1), decay),   theta' <- alpha * theta' + (1 - alpha) * theta

    The arithmetic is the original's (``mul_(alpha)`` then add ``(1 - alpha) * theta``), done with the fused
    ``torch._foreach`` kernels rather than the deprecated ``add_(number, tensor)``. Buffers (e.g. BatchNorm
    running statistics) are copied from the student, not averaged; ``unet_3D_dt`` has none.

    Args:
        teacher: the EMA model, updated in place.
        student: the trained model, same architecture.
        step: the 0-based iteration just finished.
        decay: the largest alpha (0.99 as released).
    Returns:
        the alpha used.
    Raises:
        ValueError: if ``step`` < 0, ``decay`` is outside [0, 1], or the two models' parameters or buffers
            do not match by name and shape.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, but found {step}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], but found {decay}")
    alpha = min(1.0 - 1.0 / (step + 1), decay)

    t_params, s_params = _matched(dict(teacher.named_parameters()), dict(student.named_parameters()), "parameters")
    if t_params:
        torch._foreach_mul_(t_params, alpha)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - alpha)
    t_bufs, s_bufs = _matched(dict(teacher.named_buffers()), dict(student.named_buffers()), "buffers")
    for t_buf, s_buf in zip(t_bufs, s_bufs):
        t_buf.copy_(s_buf)
    return alpha


def _matched(teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor], kind: str) -> tuple[list, list]:
    """The two models' tensors in the same order; raise if names or shapes differ."""
    if teacher.keys() != student.keys():
        missing = sorted(student.keys() - teacher.keys())[:3]
        extra = sorted(teacher.keys() - student.keys())[:3]
        raise ValueError(f"teacher and student {kind} differ: missing in teacher {missing}, extra {extra}")
    names = list(student)
    for name in names:
        if teacher[name].shape != student[name].shape:
            raise ValueError(
                f"{kind[:-1]} {name!r}: teacher {tuple(teacher[name].shape)} vs student {tuple(student[name].shape)}"
            )
    return [teacher[n] for n in names], [student[n].detach() for n in names]
