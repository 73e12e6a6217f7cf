"""``speed.fused_norm``: InstanceNorm3d + ReLU as one step, and the module swap that puts it into the U-Nets, against
the plain modules of the published network."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks.unet_3D import unet_3D_ds, unet_3D_dt
from networks.vnet import VNet
from speed.fused_norm import FusedConvNormReLU, fuse_norm_relu, instance_norm_relu

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
    # with a graph, inplace is ignored: the input (a leaf that needs its gradient) stays as it was
    y = kept.clone().requires_grad_()
    out = instance_norm_relu(y, inplace=True)
    assert out.data_ptr() != y.data_ptr()
    torch.testing.assert_close(y.detach(), kept, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (1, 2, 1, 1, 1)])
def test_instance_norm_relu_rejects_non_volumes_and_single_voxels(shape):
    with pytest.raises(ValueError, match="instance_norm_relu expects"):
        instance_norm_relu(torch.zeros(shape))


def test_instance_norm_relu_of_bfloat16_under_autocast_matches_the_module():
    x = torch.randn(1, 4, 8, 8, 8) * 3 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _plain(x.bfloat16())
        got = instance_norm_relu(x.bfloat16())
    assert got.dtype == expected.dtype == torch.bfloat16
    # statistics in float32 on both sides: the outputs differ by at most one bf16 rounding step
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)


def test_fuse_norm_relu_keeps_the_modules_and_state_dict_keys():
    torch.manual_seed(0)
    net = unet_3D_dt(feature_scale=8)
    keys = list(net.state_dict())
    assert not any(isinstance(m, FusedConvNormReLU) for m in net.modules())  # the published network is plain
    fused = copy.deepcopy(net)
    assert fuse_norm_relu(fused) == 18  # two conv blocks in each of 5 encoder and 4 decoder stages
    assert list(fused.state_dict()) == keys
    for key, value in net.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value)
    assert sum(isinstance(m, nn.InstanceNorm3d) for m in fused.modules()) == 18  # the norms stay, inside the blocks
    assert all(type(m) is FusedConvNormReLU for m in fused.modules() if isinstance(m, nn.Sequential) and len(m) == 3)
    assert fuse_norm_relu(fused) == 0  # nothing left to swap
    fused.load_state_dict(net.state_dict())  # the published checkpoints load as they are


def test_networks_without_conv_norm_relu_blocks_are_left_as_they_are():
    torch.manual_seed(0)
    for net in (VNet(n_filters=4, normalization="batchnorm"), VNet(n_filters=4, normalization="none")):
        before = [type(m) for m in net.modules()]
        assert fuse_norm_relu(net) == 0
        assert [type(m) for m in net.modules()] == before


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fused_network_computes_what_the_plain_one_does(mode):
    # float64, so that only a wrong computation (not float rounding through 18 norms) can differ
    torch.manual_seed(3)
    plain = unet_3D_dt(feature_scale=16).double()
    fused = copy.deepcopy(plain)
    fuse_norm_relu(fused)
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    results = []
    for net in (plain, fused):
        net.train(mode == "train")
        torch.manual_seed(7)  # the same dropout masks in train mode (contiguous activations: F.dropout's own)
        dis, logits = net(x)
        (logits.square().mean() + dis.mean()).backward()
        assert logits.is_contiguous() and dis.is_contiguous()
        results.append((logits.detach(), [p.grad for p in net.parameters()]))
    logits, grads = results[1]
    torch.testing.assert_close(logits, results[0][0], rtol=1e-10, atol=1e-10)
    for got, expected in zip(grads, results[0][1]):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_fused_network_in_float32_agrees_to_float_rounding():
    torch.manual_seed(4)
    plain = unet_3D_dt(feature_scale=16).eval()
    fused = copy.deepcopy(plain)
    fuse_norm_relu(fused)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x)[1], plain(x)[1], rtol=1e-5, atol=1e-5)


def test_deep_supervision_net_fused_computes_what_the_plain_one_does():
    torch.manual_seed(5)
    plain = unet_3D_ds(feature_scale=16).double().eval()
    fused = copy.deepcopy(plain)
    assert fuse_norm_relu(fused) == 18
    x = torch.randn(1, 1, 32, 32, 32, dtype=torch.float64)
    outs = []
    for net in (plain, fused):
        heads = net(x)
        sum(h.square().mean() for h in heads).backward()
        outs.append((heads, [p.grad for p in net.parameters()]))
    for got, expected in zip(outs[1][0] + tuple(outs[1][1]), outs[0][0] + tuple(outs[0][1])):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
