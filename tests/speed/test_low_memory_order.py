"""UG-MCL's low-memory order through the speed door: teacher passes first, chunks run as forwards of B rows, the
student's masks drawn ahead; the losses of the released order."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import TrainConfig
from methods.base import Batch, Passes
from methods.ugmcl import UGMCL
from networks.unet_3D import unet_3D_dt
from speed import SpeedOptions, prepare_training
from speed.passes import PredrawnPasses

PLAIN = SpeedOptions(keep_freed_memory=0)  # the door with nothing but the masks drawn in order


def _method(student: nn.Module, low_memory: int, door: SpeedOptions | None) -> UGMCL:
    """UG-MCL on ``student``, through ``prepare_training`` with ``door`` (None: the plain passes)."""
    cfg = TrainConfig(patch_size=(32, 32, 32), batch_size=2, labeled_bs=1, mc_passes=3, mc_chunk=2,
                      max_iterations=10, low_memory=low_memory)
    if door is None:
        return UGMCL(student, cfg)
    speed = prepare_training(student, door, torch.device("cpu"))
    return UGMCL(student, cfg, passes=speed.passes)


def _run(student: nn.Module, low_memory: int, door: SpeedOptions | None, steps: int = 2) -> list[dict[str, float]]:
    """``steps`` iterations of the training loop on a fixed batch; the logs of each."""
    method = _method(student, low_memory, door)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    batch = Batch(torch.randn(2, 1, 32, 32, 32, generator=g), (torch.rand(2, 32, 32, 32, generator=g) > 0.7).long(), 1)
    torch.manual_seed(99)
    logs = []
    for step in range(steps):
        loss, log = method.training_step(batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(step)
        logs.append(log)
    return logs


def _net() -> nn.Module:
    torch.manual_seed(0)
    return unet_3D_dt(feature_scale=16).train()


def test_low_memory_order_reproduces_the_released_order_bit_for_bit():
    net = _net()
    released = _run(copy.deepcopy(net), low_memory=0, door=None)
    reordered = _run(copy.deepcopy(net), low_memory=1, door=PLAIN)
    assert reordered == released  # every logged float, both iterations
    assert released[0]["mask_ratio"] < 1.0  # the uncertainty mask is not trivial, so it was compared too
    assert _run(copy.deepcopy(net), low_memory=0, door=PLAIN) == released  # the door in the released order


def test_low_memory_order_draws_every_dropout_mask_ahead(monkeypatch):
    """Student, target pass and Monte-Carlo passes all take masks drawn ahead (``bernoulli_mask``, faster on CPU)
    instead of letting ``F.dropout`` draw; the released order lets ``F.dropout`` draw all of them."""
    real_dropout = F.dropout
    drawing = []

    def counting_dropout(x, p=0.5, training=True, inplace=False):
        if training and 0.0 < p < 1.0:
            drawing.append(tuple(x.shape))
        return real_dropout(x, p, training, inplace)

    monkeypatch.setattr(F, "dropout", counting_dropout)  # what nn.Dropout and PredrawnDropout call
    net = _net()
    _run(copy.deepcopy(net), low_memory=1, door=PLAIN, steps=1)
    assert drawing == []
    _run(copy.deepcopy(net), low_memory=0, door=None, steps=1)
    # 2 dropouts per forward: student (1 forward), target pass (1), T = 3 passes in chunks of 2 (2 forwards)
    assert len(drawing) == 2 * 4


@pytest.mark.parametrize(
    ("low_memory", "door", "teacher_rows", "student_first"),
    [
        (1, PLAIN, [2, 2, 2, 2], False),  # chunk 1 (4 rows) in two pieces of B = 2, chunk 2 (2 rows), after the target
        (0, PLAIN, [2, 4, 2], True),  # released: target pass, then whole chunks
        (1, None, [2, 4, 2], True),  # plain passes cannot reserve: the released order, whatever the config says
    ],
)
def test_the_order_follows_the_configuration_and_the_passes(low_memory, door, teacher_rows, student_first):
    student = _net()
    method = _method(student, low_memory, door)
    order: list[tuple[str, int]] = []
    method.teacher.register_forward_pre_hook(lambda module, args: order.append(("teacher", args[0].shape[0])))
    student.register_forward_pre_hook(lambda module, args: order.append(("student", args[0].shape[0])))
    g = torch.Generator().manual_seed(5)
    batch = Batch(torch.randn(2, 1, 32, 32, 32, generator=g), torch.zeros(2, 32, 32, 32, dtype=torch.long), 1)
    method.training_step(batch, 0)
    assert [rows for who, rows in order if who == "teacher"] == teacher_rows
    assert (order[0] == ("student", 2)) is student_first
    assert order.count(("student", 2)) == 1


def test_an_eval_mode_student_keeps_the_released_order():
    student = _net()
    method = _method(student, 1, PLAIN)
    assert isinstance(method.passes, PredrawnPasses) and method.passes.can_reserve(student)
    student.eval()
    order: list[str] = []
    method.teacher.register_forward_pre_hook(lambda *_: order.append("teacher"))
    student.register_forward_pre_hook(lambda *_: order.append("student"))
    batch = Batch(torch.randn(2, 1, 32, 32, 32), torch.zeros(2, 32, 32, 32, dtype=torch.long), 1)
    method.training_step(batch, 0)
    assert order[0] == "student"


class _NoMaskDrawing(nn.Module):
    """A dual-task stand-in that is no U-Net: its masks cannot be drawn ahead, the released order is used."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.drop(self.conv(x))
        return torch.tanh(z), z


def test_students_that_cannot_draw_masks_ahead_keep_the_released_order():
    torch.manual_seed(0)
    net = _NoMaskDrawing()
    assert _run(copy.deepcopy(net), low_memory=1, door=PLAIN) == _run(copy.deepcopy(net), low_memory=0, door=None)
    assert not PredrawnPasses().can_reserve(net)
    assert not Passes().can_reserve(net)


def test_the_command_line_switches_the_order_off():
    from train_UGMCL_3D import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args(["--low_memory", "0"])).low_memory == 0
    assert config_from_args(build_parser().parse_args([])).low_memory == 1
