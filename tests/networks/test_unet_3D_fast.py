"""The U-Net fast paths (issue #7) against the plain, released computation: fused norm + ReLU, channels-last
layout, logical-order dropout and pre-drawn dropout masks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks.unet_3D import _dropout as unet_dropout
from networks.unet_3D import instance_norm_relu, set_fused_norm, to_channels_last, unet_3D, unet_3D_ds, unet_3D_dt

CL = torch.channels_last_3d


def _plain(x: torch.Tensor) -> torch.Tensor:
    """The released modules: InstanceNorm3d(affine=False) then ReLU."""
    return F.relu(F.instance_norm(x))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_instance_norm_relu_equals_the_norm_and_relu_modules(layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 4, 7, generator=g, dtype=torch.float64) * 3 + 2
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    out = instance_norm_relu(x)
    torch.testing.assert_close(out, _plain(x), rtol=0, atol=1e-12)
    assert out.is_contiguous(memory_format=CL) == (layout == "channels_last")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_instance_norm_relu_gradient_equals_autograd_of_the_modules(layout):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 4, 3, 6, generator=g, dtype=torch.float64) + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    # the incoming gradient is a channel slice, as a cat in the decoder hands it back
    grad = torch.randn(2, 9, 4, 3, 6, generator=g, dtype=torch.float64)[:, 2:7]
    ours = torch.autograd.grad(instance_norm_relu(x.requires_grad_()), x, grad)[0]
    plain = torch.autograd.grad(_plain(x), x, grad)[0]
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(instance_norm_relu, (x,))


def test_instance_norm_relu_statistics_stay_float_precise_on_a_large_channels_last_volume():
    # a one-stage float32 sum over 64^3 strided voxels loses ~1e-4; the two-stage sums keep ~1e-6
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 64, 64, 64, generator=g) * 2 + 3
    reference = _plain(x.double())
    for layout in (torch.contiguous_format, CL):
        out = instance_norm_relu(x.contiguous(memory_format=layout))
        assert (out.double() - reference).abs().max() < 2e-6


def test_instance_norm_relu_works_in_place_only_when_asked_and_without_a_graph():
    x = torch.randn(1, 3, 4, 4, 4)
    kept = x.clone()
    instance_norm_relu(x)
    torch.testing.assert_close(x, kept, rtol=0, atol=0)
    out = instance_norm_relu(x, inplace=True)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(out, _plain(kept), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (1, 2, 1, 1, 1)])
def test_instance_norm_relu_rejects_non_volumes_and_single_voxels(shape):
    with pytest.raises(ValueError, match="instance_norm_relu expects"):
        instance_norm_relu(torch.zeros(shape))


def test_fast_paths_keep_modules_keys_and_default_to_the_released_computation():
    torch.manual_seed(0)
    net = unet_3D_dt(feature_scale=8)
    keys = list(net.state_dict())
    assert not any(getattr(m, "fused", False) for m in net.modules())
    fast = to_channels_last(set_fused_norm(copy.deepcopy(net)))
    assert list(fast.state_dict()) == keys
    assert sum(isinstance(m, nn.InstanceNorm3d) for m in fast.modules()) == 18
    assert fast.conv1.conv1[0].weight.is_contiguous(memory_format=CL)
    assert all(getattr(m, "fused", True) for m in fast.modules() if isinstance(m, nn.Sequential) and len(m) == 3)
    set_fused_norm(fast, False)
    assert not any(getattr(m, "fused", False) for m in fast.modules())
    assert unet_3D_dt(feature_scale=8, fused_norm=True).conv1.conv1.fused


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fused_and_channels_last_networks_compute_what_the_plain_one_does(mode):
    # float64, so that only a wrong computation (not float rounding through 18 norms) can differ
    torch.manual_seed(3)
    plain = unet_3D_dt(feature_scale=16).double()
    fused = set_fused_norm(copy.deepcopy(plain))
    fused_cl = to_channels_last(set_fused_norm(copy.deepcopy(plain)))
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    results = []
    for net in (plain, fused, fused_cl):
        net.train(mode == "train")
        torch.manual_seed(7)  # the same dropout masks in train mode
        dis, logits = net(x)
        (logits.square().mean() + dis.mean()).backward()
        assert logits.is_contiguous() and dis.is_contiguous()
        results.append((logits.detach(), [p.grad for p in net.parameters()]))
    for logits, grads in results[1:]:
        torch.testing.assert_close(logits, results[0][0], rtol=1e-10, atol=1e-10)
        for got, expected in zip(grads, results[0][1]):
            torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_dropout_of_channels_last_activations_draws_the_contiguous_masks_and_random_stream():
    drop = nn.Dropout(0.3).train()
    x = torch.randn(2, 8, 4, 5, 6)
    torch.manual_seed(11)
    expected, after = F.dropout(x, 0.3, True), torch.rand(3)
    torch.manual_seed(11)
    got = unet_dropout(drop, x.contiguous(memory_format=CL))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.rand(3), after, rtol=0, atol=0)
    # plain F.dropout on the channels-last tensor would draw other masks (the reason for the helper)
    torch.manual_seed(11)
    assert not torch.equal(F.dropout(x.contiguous(memory_format=CL), 0.3, True), expected)


@pytest.mark.parametrize("channels_last", [False, True])
def test_masks_drawn_ahead_give_the_same_forward_and_random_stream(channels_last):
    torch.manual_seed(4)
    net = unet_3D_dt(feature_scale=8).train()
    if channels_last:
        to_channels_last(set_fused_norm(net))
    x = torch.randn(2, 1, 32, 32, 32)
    torch.manual_seed(21)
    expected = net(x)[1]
    expected_next = torch.randn(4)
    torch.manual_seed(21)
    net.draw_dropout_masks(x.shape)
    next_numbers = torch.randn(4)  # what runs between drawing and the forward gets the same numbers
    got = net(x)[1]
    torch.testing.assert_close(next_numbers, expected_next, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # the masks are used once: the next forward draws fresh ones
    assert not torch.equal(net(x)[1], got)


def test_masks_drawn_for_another_shape_raise_and_eval_mode_draws_nothing():
    net = unet_3D(feature_scale=8).train()
    net.draw_dropout_masks((1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="drawn for an input"):
        net(torch.randn(2, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="multiple of 16"):
        net.draw_dropout_masks((1, 1, 30, 32, 32))
    net.eval()
    state = torch.get_rng_state()
    net.draw_dropout_masks((1, 1, 32, 32, 32))
    assert torch.equal(torch.get_rng_state(), state)


def test_deep_supervision_net_with_the_fast_paths_computes_what_the_plain_one_does():
    torch.manual_seed(5)
    plain = unet_3D_ds(feature_scale=16).double().eval()
    fast = to_channels_last(set_fused_norm(copy.deepcopy(plain)))
    x = torch.randn(1, 1, 32, 32, 32, dtype=torch.float64)
    outs = []
    for net in (plain, fast):
        heads = net(x)
        sum(h.square().mean() for h in heads).backward()
        outs.append((heads, [p.grad for p in net.parameters()]))
    for got, expected in zip(outs[1][0] + tuple(outs[1][1]), outs[0][0] + tuple(outs[0][1])):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_instance_norm_relu_of_bfloat16_under_autocast_matches_the_module():
    x = torch.randn(1, 4, 8, 8, 8) * 3 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _plain(x.bfloat16())
        got = instance_norm_relu(x.bfloat16())
    assert got.dtype == expected.dtype == torch.bfloat16
    # statistics in float32 on both sides: the outputs differ by at most one bf16 rounding step
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
