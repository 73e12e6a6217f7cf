"""``speed.prepare_training``: the door the trainer takes; the same state_dict and the same UG-MCL step as the plain
path (to float rounding with the fast network, bit for bit without it)."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
from torch import nn

from engine.config import TrainConfig
from methods.base import Batch, Passes
from methods.ugmcl import UGMCL
from networks.unet_3D import unet_3D_dt
from speed import SpeedOptions, add_arguments, options_from_args, prepare_training
from speed.dropout import PredrawnDropout
from speed.fused_norm import FusedConvNormReLU
from speed.passes import PredrawnPasses


def _step(student: nn.Module, low_memory: int, options: SpeedOptions | None) -> dict[str, float]:
    """The logs of one UG-MCL step on a fixed batch, through the door with ``options`` (None: the plain path)."""
    cfg = TrainConfig(patch_size=(32, 32, 32), batch_size=2, labeled_bs=1, mc_passes=3, mc_chunk=2,
                      max_iterations=10, low_memory=low_memory)
    passes = None
    if options is not None:
        passes = prepare_training(student, options, torch.device("cpu")).passes
    method = UGMCL(student, cfg, passes=passes)
    g = torch.Generator().manual_seed(5)
    batch = Batch(torch.randn(2, 1, 32, 32, 32, generator=g), (torch.rand(2, 32, 32, 32, generator=g) > 0.7).long(), 1)
    torch.manual_seed(99)
    loss, logs = method.training_step(batch, 0)
    loss.backward()
    return logs


def test_prepare_training_keeps_the_state_dict_and_the_ugmcl_step():
    torch.manual_seed(0)
    net = unet_3D_dt(feature_scale=16).train()
    keys = list(net.state_dict())
    released = _step(copy.deepcopy(net), low_memory=0, options=None)

    fast_student = copy.deepcopy(net)
    speed = prepare_training(fast_student, SpeedOptions(fast_network=True, keep_freed_memory=0), torch.device("cpu"))
    assert list(fast_student.state_dict()) == keys
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in fast_student.state_dict().items())
    assert isinstance(speed.passes, PredrawnPasses) and speed.passes.can_reserve(fast_student)
    assert sum(isinstance(m, FusedConvNormReLU) for m in fast_student.modules()) == 18
    assert any("fast network" in note for note in speed.notes)

    fast = _step(copy.deepcopy(net), low_memory=1, options=SpeedOptions(fast_network=True, keep_freed_memory=0))
    for key in ("loss", "supervised_loss", "consistency_dist", "cross_task_dist", "uncertainty_mean"):
        assert fast[key] == pytest.approx(released[key], rel=1e-5, abs=1e-7), key
    assert released["mask_ratio"] < 1.0  # the uncertainty mask is not trivial

    # without the fast network, the low-memory order through the door is the released order bit for bit
    assert _step(copy.deepcopy(net), low_memory=1, options=SpeedOptions(keep_freed_memory=0)) == released


def test_fast_network_is_ignored_off_cpu():
    net = unet_3D_dt(feature_scale=16)
    speed = prepare_training(net, SpeedOptions(fast_network=True), torch.device("cuda"))  # the net is not moved
    assert not any(isinstance(m, FusedConvNormReLU) for m in net.modules())
    assert isinstance(net.dropout1, PredrawnDropout)  # masks in order on every device
    assert net.conv1.conv1[0].weight.is_contiguous()
    assert any("--fast_network ignored on cuda" in note for note in speed.notes)
    assert not speed.passes.keep_memory_around_teacher


def test_the_plain_path_without_the_door():
    method = UGMCL(unet_3D_dt(feature_scale=16), TrainConfig(mc_passes=2, max_iterations=100))
    assert type(method.passes) is Passes and not method.passes.can_reserve(method.student)


def test_options_from_the_command_line_and_their_checks():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert options_from_args(parser.parse_args([])) == SpeedOptions()
    assert options_from_args(parser.parse_args(["--fast"])) == SpeedOptions(fast_network=True)
    assert options_from_args(parser.parse_args(["--keep_freed_memory", "1", "--compile", "1"])) == SpeedOptions(
        keep_freed_memory=1, compile=True)
    with pytest.raises(ValueError, match="do not go together"):
        SpeedOptions(fast_network=True, compile=True)
    assert TrainConfig(speed={"fast_network": True}).speed == SpeedOptions(fast_network=True)


def test_compile_is_a_no_op_unless_asked():
    net = unet_3D_dt(feature_scale=16)
    speed = prepare_training(net, SpeedOptions(keep_freed_memory=0), torch.device("cpu"))
    notes = list(speed.notes)
    speed.compile([net])
    assert speed.notes == notes
    assert net._compiled_call_impl is None
