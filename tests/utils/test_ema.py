"""EMA teacher: creation and the alpha = min(1 - 1/(t + 1), decay) update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from utils.ema import create_ema_teacher, update_ema


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(1, 3, 3), nn.BatchNorm3d(3), nn.Conv3d(3, 2, 1))


def test_teacher_is_an_independent_copy_without_gradients():
    student = _net(0)
    teacher = create_ema_teacher(student)
    for s, t in zip(student.parameters(), teacher.parameters()):
        assert torch.equal(s, t) and s.data_ptr() != t.data_ptr()
        assert not t.requires_grad and s.requires_grad
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    assert not torch.equal(next(student.parameters()), next(teacher.parameters()))


def test_first_step_copies_the_student():
    student, teacher = _net(0), _net(1)
    assert update_ema(teacher, student, step=0) == 0.0
    for s, t in zip(student.parameters(), teacher.parameters()):
        assert torch.equal(s, t)


@pytest.mark.parametrize(("step", "alpha"), [(1, 0.5), (9, 0.9), (5000, 0.99)])
def test_later_steps_follow_the_ema_formula(step, alpha):
    student, teacher = _net(0), _net(1)
    expected = [
        alpha * t.detach().clone() + (1 - alpha) * s.detach()
        for s, t in zip(student.parameters(), teacher.parameters())
    ]
    assert update_ema(teacher, student, step=step, decay=0.99) == pytest.approx(alpha)
    for t, e in zip(teacher.parameters(), expected):
        torch.testing.assert_close(t, e)


def test_buffers_are_copied_from_the_student():
    student, teacher = _net(0), _net(1)
    student[1].running_mean.fill_(3.0)
    update_ema(teacher, student, step=100)
    assert torch.equal(teacher[1].running_mean, torch.full((3,), 3.0))


def test_update_records_no_gradient():
    student, teacher = _net(0), create_ema_teacher(_net(0))
    update_ema(teacher, student, step=3)
    assert all(not t.requires_grad and t.grad_fn is None for t in teacher.parameters())


def test_mismatched_models_and_bad_options_raise_value_error():
    student = _net(0)
    with pytest.raises(ValueError, match="differ"):
        update_ema(nn.Sequential(nn.Conv3d(1, 3, 3)), student, step=1)
    with pytest.raises(ValueError, match="shape|teacher"):
        update_ema(nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(3), nn.Conv3d(3, 2, 1)), student, step=1)
    with pytest.raises(ValueError, match="step"):
        update_ema(create_ema_teacher(student), student, step=-1)
    with pytest.raises(ValueError, match="decay"):
        update_ema(create_ema_teacher(student), student, step=1, decay=1.5)
