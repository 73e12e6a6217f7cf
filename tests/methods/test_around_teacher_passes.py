"""``EMATeacherMethod.around_teacher_passes``: every teacher forward of a step runs inside it, the student's outside.

The trainer sets it to ``utils.allocator.keeping_freed_memory`` (``--keep_freed_memory 2`` on CPU), which must
cover the repeated no-grad passes and end before the student's saved activations pile up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from engine.config import TrainConfig
from methods.base import Batch
from methods.mean_teacher import MeanTeacher
from methods.uamt import UAMT
from methods.ugmcl import UGMCL
from networks.unet_3D import unet_3D, unet_3D_dt


def _batch() -> Batch:
    gen = torch.Generator().manual_seed(0)
    label = torch.zeros(2, 32, 32, 32, dtype=torch.long)
    label[:, 8:20, 10:22, 6:18] = 1
    return Batch(torch.randn(2, 1, 32, 32, 32, generator=gen), label, 1)


CASES = [
    (MeanTeacher, unet_3D, {}, 1),
    (UAMT, unet_3D_dt, {}, 1 + 3),  # the target pass, then T = 3 passes one at a time
    (UGMCL, unet_3D_dt, {"low_memory": 0}, 1 + 3),
    (UGMCL, unet_3D_dt, {"low_memory": 1}, 1 + 3),
]


@pytest.mark.parametrize(("method_cls", "net_cls", "overrides", "teacher_forwards"), CASES)
def test_teacher_forwards_run_inside_and_the_student_outside(method_cls, net_cls, overrides, teacher_forwards):
    torch.manual_seed(0)
    student = net_cls(feature_scale=16)
    cfg = replace(TrainConfig(mc_passes=3, mc_chunk=1, max_iterations=100), **overrides)
    method = method_cls(student, cfg)
    inside, entered, seen = [False], [], []

    @contextlib.contextmanager
    def probe() -> Iterator[None]:
        assert not inside[0], "entered twice"
        inside[0] = True
        entered.append(1)
        try:
            yield
        finally:
            inside[0] = False

    method.around_teacher_passes = probe
    method.teacher.register_forward_hook(lambda *_: seen.append(("teacher", inside[0])))
    student.register_forward_hook(lambda *_: seen.append(("student", inside[0])))
    for step in range(2):
        seen.clear()
        loss, _ = method.training_step(_batch(), step)
        loss.backward()
        assert len(entered) == step + 1  # once per step
        assert seen.count(("teacher", True)) == teacher_forwards
        assert seen.count(("student", False)) == 1
        assert len(seen) == teacher_forwards + 1  # nothing ran on the wrong side


def test_the_default_is_a_no_op_context():
    torch.manual_seed(0)
    method = UGMCL(unet_3D_dt(feature_scale=16), TrainConfig(mc_passes=2, max_iterations=100))
    assert method.around_teacher_passes is contextlib.nullcontext
