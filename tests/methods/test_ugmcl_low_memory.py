"""UG-MCL's low-memory order (issue #7): teacher passes first, chunks split into batch-sized forwards; same losses."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.config import TrainConfig
from methods.base import Batch
from methods.ugmcl import UGMCL
from networks.unet_3D import set_fused_norm, to_channels_last, unet_3D_dt


def _run(student: nn.Module, low_memory: bool, steps: int = 2) -> list[dict[str, float]]:
    """``steps`` iterations of the training loop on a fixed batch; the logs of each."""
    cfg = TrainConfig(patch_size=(32, 32, 32), batch_size=2, labeled_bs=1, mc_passes=3, mc_chunk=2, max_iterations=10)
    method = UGMCL(student, cfg, low_memory=low_memory)
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


def test_low_memory_order_reproduces_the_released_order_bit_for_bit():
    torch.manual_seed(0)
    net = unet_3D_dt(feature_scale=16).train()
    released = _run(copy.deepcopy(net), low_memory=False)
    reordered = _run(copy.deepcopy(net), low_memory=True)
    assert reordered == released  # every logged float, both iterations
    assert released[0]["mask_ratio"] < 1.0  # the uncertainty mask is not trivial, so it was compared too


def test_low_memory_order_draws_every_dropout_mask_ahead(monkeypatch):
    """Student, target pass and Monte-Carlo passes all take masks drawn ahead (``bernoulli_mask``, faster on CPU)
    instead of letting ``F.dropout`` draw; the released order lets ``F.dropout`` draw all of them."""
    import networks.unet_3D as unet_module

    real_dropout = unet_module.F.dropout
    drawing = []

    def counting_dropout(x, p=0.5, training=True, inplace=False):
        if training and 0.0 < p < 1.0:
            drawing.append(tuple(x.shape))
        return real_dropout(x, p, training, inplace)

    monkeypatch.setattr(unet_module.F, "dropout", counting_dropout)
    torch.manual_seed(0)
    net = unet_3D_dt(feature_scale=16).train()
    _run(copy.deepcopy(net), low_memory=True, steps=1)
    assert drawing == []
    _run(copy.deepcopy(net), low_memory=False, steps=1)
    # 2 dropouts per forward: student (1 forward), target pass (1), T = 3 passes in chunks of 2 (2 forwards)
    assert len(drawing) == 2 * 4


def test_low_memory_order_with_the_fast_network_matches_to_float_rounding():
    torch.manual_seed(0)
    net = unet_3D_dt(feature_scale=16).train()
    released = _run(copy.deepcopy(net), low_memory=False, steps=1)[0]
    fast = _run(to_channels_last(set_fused_norm(copy.deepcopy(net))), low_memory=True, steps=1)[0]
    for key in ("loss", "supervised_loss", "consistency_dist", "cross_task_dist", "uncertainty_mean"):
        assert fast[key] == pytest.approx(released[key], rel=1e-5, abs=1e-7), key


class _NoMaskDrawing(nn.Module):
    """A dual-task stand-in without ``draw_dropout_masks``: the released order is used."""

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
    assert _run(copy.deepcopy(net), low_memory=True) == _run(copy.deepcopy(net), low_memory=False)


def test_the_order_follows_the_configuration_unless_given():
    net = unet_3D_dt(feature_scale=16)
    assert UGMCL(net, TrainConfig()).low_memory is True
    assert UGMCL(net, TrainConfig(low_memory=0)).low_memory is False
    assert UGMCL(net, TrainConfig(low_memory=0), low_memory=True).low_memory is True


def test_the_command_line_switches_the_order_off():
    from train_UGMCL_3D import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args(["--low_memory", "0"])).low_memory == 0
    assert config_from_args(build_parser().parse_args([])).low_memory == 1
