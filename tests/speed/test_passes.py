"""``speed.passes.PredrawnPasses`` against the plain ``methods.base.Passes``: forwards in pieces give the
uncertainty, masks and random stream of one forward of the chunk; every teacher forward of a step runs inside
``around_teacher()``, the student's outside."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from torch import nn

from engine.config import TrainConfig
from methods.base import Batch, Passes
from methods.mean_teacher import MeanTeacher
from methods.uamt import UAMT
from methods.ugmcl import UGMCL
from networks.outputs import segmentation_logits
from networks.unet_3D import unet_3D, unet_3D_dt
from speed import passes as passes_module
from speed.dropout import predraw_dropout
from speed.passes import PredrawnPasses
from utils.uncertainty import mc_dropout_uncertainty


def _uncertainty(teacher: nn.Module, image: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    result = mc_dropout_uncertainty(teacher, image, passes=4, chunk=2, **kwargs)[0]
    return result, torch.rand(3)  # and where the random stream stands afterwards


def _teachers(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A plain teacher and a copy whose dropout can draw ahead."""
    torch.manual_seed(seed)
    plain = unet_3D_dt(feature_scale=16).train()
    predrawn = copy.deepcopy(plain)
    predraw_dropout(predrawn)
    return plain, predrawn


def test_forwards_in_pieces_give_the_chunked_uncertainty_and_random_stream():
    plain, teacher = _teachers()
    image = torch.randn(2, 1, 32, 32, 32)
    chunked, after = _uncertainty(plain, image)
    assert torch.equal(_uncertainty(teacher, image)[0], chunked)  # without pieces, the predrawn teacher is the plain one
    rows: list[int] = []
    teacher.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    passes = PredrawnPasses()
    split, split_after = _uncertainty(
        teacher, image, forward=lambda x: passes.forward_in_pieces(teacher, x, 2, segmentation_logits))
    assert rows == [2, 2, 2, 2]  # two chunks of 2 passes x batch 2, each in two forwards
    torch.testing.assert_close(split, chunked, rtol=0, atol=0)
    torch.testing.assert_close(split_after, after, rtol=0, atol=0)
    # one pass per forward *without* masks drawn for the chunk would draw other masks
    torch.manual_seed(3)
    per_pass = mc_dropout_uncertainty(teacher, image, passes=4, chunk=1)[0]
    assert not torch.equal(per_pass, chunked)


def test_forward_in_pieces_of_a_tuple_output_is_one_forward_of_the_batch():
    plain, teacher = _teachers(1)
    x = torch.randn(4, 1, 32, 32, 32)
    torch.manual_seed(5)
    expected, after = plain(x), torch.rand(3)
    torch.manual_seed(5)
    got = PredrawnPasses().forward_in_pieces(teacher, x, 2)
    assert isinstance(got, tuple) and len(got) == 2
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    torch.testing.assert_close(torch.rand(3), after, rtol=0, atol=0)
    torch.manual_seed(5)
    whole = PredrawnPasses().forward_in_pieces(teacher, x, 4)  # one piece: the output as it is
    for g, e in zip(whole, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


class _Counting(nn.Module):
    """A teacher that cannot draw its masks ahead and records its batch sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        return self.conv(x)


@pytest.mark.parametrize("passes", [Passes(), PredrawnPasses()])
def test_teachers_that_cannot_draw_masks_ahead_run_whole_chunks(passes):
    teacher = _Counting()
    mc_dropout_uncertainty(teacher, torch.randn(2, 1, 4, 4, 4), passes=4, chunk=2,
                           forward=lambda x: passes.forward_in_pieces(teacher, x, 2))
    assert teacher.rows == [4, 4]
    assert not passes.can_reserve(teacher)


def test_which_networks_can_reserve():
    plain, predrawn = _teachers()
    assert PredrawnPasses().can_reserve(predrawn)
    assert not PredrawnPasses().can_reserve(plain)
    assert not Passes().can_reserve(predrawn)  # the plain passes never reserve
    with pytest.raises(ValueError, match="cannot reserve"):
        Passes().reserve_randomness(predrawn, (1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="cannot draw its dropout masks ahead"):
        PredrawnPasses().reserve_randomness(plain, (1, 1, 32, 32, 32))


def test_reserved_randomness_is_the_next_forwards():
    plain, predrawn = _teachers(2)
    x = torch.randn(2, 1, 32, 32, 32)
    torch.manual_seed(6)
    expected, between = plain(x), torch.randn(3)
    torch.manual_seed(6)
    PredrawnPasses().reserve_randomness(predrawn, x.shape)
    torch.testing.assert_close(torch.randn(3), between, rtol=0, atol=0)  # other work gets the later numbers
    for g, e in zip(predrawn(x), expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def _batch() -> Batch:
    gen = torch.Generator().manual_seed(0)
    label = torch.zeros(2, 32, 32, 32, dtype=torch.long)
    label[:, 8:20, 10:22, 6:18] = 1
    return Batch(torch.randn(2, 1, 32, 32, 32, generator=gen), label, 1)


class _Probe(PredrawnPasses):
    """Predrawn passes whose ``around_teacher()`` records whether it is entered."""

    def __init__(self) -> None:
        super().__init__()
        self.inside, self.entered = False, 0

    @contextlib.contextmanager
    def _probe(self) -> Iterator[None]:
        assert not self.inside, "entered twice"
        self.inside = True
        self.entered += 1
        try:
            yield
        finally:
            self.inside = False

    def around_teacher(self) -> contextlib.AbstractContextManager[None]:
        return self._probe()


CASES = [
    (MeanTeacher, unet_3D, {}, 1),
    (UAMT, unet_3D_dt, {}, 1 + 3),  # the target pass, then T = 3 passes one at a time
    (UGMCL, unet_3D_dt, {"low_memory": 0}, 1 + 3),
    (UGMCL, unet_3D_dt, {"low_memory": 1}, 1 + 3),  # teacher first, in pieces of B rows: still 4 forwards
]


@pytest.mark.parametrize(("method_cls", "net_cls", "overrides", "teacher_forwards"), CASES)
def test_teacher_forwards_run_inside_and_the_student_outside(method_cls, net_cls, overrides, teacher_forwards):
    torch.manual_seed(0)
    student = net_cls(feature_scale=16)
    predraw_dropout(student)
    cfg = replace(TrainConfig(mc_passes=3, mc_chunk=1, max_iterations=100), **overrides)
    passes = _Probe()
    method = method_cls(student, cfg, passes=passes)
    seen = []
    method.teacher.register_forward_hook(lambda *_: seen.append(("teacher", passes.inside)))
    student.register_forward_hook(lambda *_: seen.append(("student", passes.inside)))
    for step in range(2):
        seen.clear()
        loss, _ = method.training_step(_batch(), step)
        loss.backward()
        assert passes.entered == step + 1  # once per step
        assert seen.count(("teacher", True)) == teacher_forwards
        assert seen.count(("student", False)) == 1
        assert len(seen) == teacher_forwards + 1  # nothing ran on the wrong side
        if overrides.get("low_memory"):
            assert seen[-1][0] == "student"  # the low-memory order: the teacher's passes first


def test_the_default_passes_are_plain_and_their_context_a_no_op():
    torch.manual_seed(0)
    method = UGMCL(unet_3D_dt(feature_scale=16), TrainConfig(mc_passes=2, max_iterations=100))
    assert type(method.passes) is Passes
    assert isinstance(method.passes.around_teacher(), contextlib.nullcontext)
    assert isinstance(PredrawnPasses().around_teacher(), contextlib.nullcontext)


def test_predrawn_passes_keep_memory_around_the_teacher_when_asked(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def probe(trim_above: int = 1 << 30) -> Iterator[bool]:
        entered.append(1)
        yield True

    monkeypatch.setattr(passes_module, "keeping_freed_memory", probe)
    with PredrawnPasses(keep_memory_around_teacher=True).around_teacher():
        pass
    assert entered == [1]
