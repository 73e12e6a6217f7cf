"""Tests for networks/vnet.py: V-Net trunk (UA-MT / DTC) and the dual-task head of the UG-MCL paper."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from networks.vnet import NORMALIZATIONS, VNet, VNet_dt

NORMS = ["batchnorm", "groupnorm", "instancenorm", "none"]


def _count_by_hand(n: int, in_channels: int, n_classes: int, norm_params_per_channel: int) -> int:
    """Parameters from the description: stages 1,2,3,3,3 / 3,3,2,1 of k3 convs, k2 down/up convs, 1x1 head."""

    def conv(cin: int, cout: int, k: int) -> int:
        return cin * cout * k**3 + cout + norm_params_per_channel * cout

    def stage(n_convs: int, cin: int, cout: int) -> int:
        return conv(cin, cout, 3) + (n_convs - 1) * conv(cout, cout, 3)

    encoder = stage(1, in_channels, n) + stage(2, 2 * n, 2 * n) + stage(3, 4 * n, 4 * n)
    encoder += stage(3, 8 * n, 8 * n) + stage(3, 16 * n, 16 * n)
    down = conv(n, 2 * n, 2) + conv(2 * n, 4 * n, 2) + conv(4 * n, 8 * n, 2) + conv(8 * n, 16 * n, 2)
    up = conv(16 * n, 8 * n, 2) + conv(8 * n, 4 * n, 2) + conv(4 * n, 2 * n, 2) + conv(2 * n, n, 2)
    decoder = stage(3, 8 * n, 8 * n) + stage(3, 4 * n, 4 * n) + stage(2, 2 * n, 2 * n) + stage(1, n, n)
    head = n * n_classes + n_classes
    return encoder + down + up + decoder + head


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_default_vnet_has_the_9_44_million_parameters_of_dtc():
    net = VNet()
    assert _n_params(net) == _count_by_hand(16, 1, 2, norm_params_per_channel=2)
    assert round(_n_params(net) / 1e6, 2) == 9.45  # DTC reports "9.44M" (truncated)
    dual = VNet_dt()
    assert _n_params(dual) == _n_params(net) + 16 * 2 + 2


@pytest.mark.parametrize("normalization", NORMS)
def test_output_shapes_for_each_normalization(normalization):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 16, 32)
    single = VNet(n_filters=4, n_classes=3, normalization=normalization, has_dropout=True)
    dual = VNet_dt(n_filters=4, n_classes=3, normalization=normalization, has_dropout=True)
    assert single(x).shape == (2, 3, 32, 16, 32)
    dis, seg = dual(x)
    assert dis.shape == seg.shape == (2, 3, 32, 16, 32)
    assert dis.abs().max() < 1
    per_channel = {"batchnorm": 2, "groupnorm": 2, "instancenorm": 0, "none": 0}[normalization]
    assert _n_params(single) == _count_by_hand(4, 1, 3, per_channel)


def test_norm_layers_are_the_requested_kind():
    n_bn = sum(isinstance(m, nn.BatchNorm3d) for m in VNet(n_filters=4).modules())
    assert n_bn == 21 + 8  # 21 k3 convs, 4 down, 4 up
    group_net = VNet(n_filters=16, normalization="groupnorm")
    groups = [m.num_groups for m in group_net.modules() if isinstance(m, nn.GroupNorm)]
    assert set(groups) == {16}
    inorm = [m for m in VNet(n_filters=4, normalization="instancenorm").modules() if isinstance(m, nn.InstanceNorm3d)]
    assert len(inorm) == 29 and not any(m.affine for m in inorm)
    bare = VNet(n_filters=4, normalization="none")
    assert not any(isinstance(m, (nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm3d)) for m in bare.modules())


def test_unknown_normalization_raises_value_error_listing_the_options():
    assert tuple(NORMALIZATIONS) == tuple(NORMS)
    with pytest.raises(ValueError, match=r"batchnorm.*groupnorm.*instancenorm.*none.*'layernorm'"):
        VNet(normalization="layernorm")
    with pytest.raises(ValueError, match="normalization"):
        VNet_dt(normalization="BatchNorm")


def test_skip_connections_are_added_not_concatenated():
    net = VNet(n_filters=4)
    # Block six reads the upsampled map (8n channels) directly: a concatenation would need 16n input channels.
    assert net.block_six.conv[0].in_channels == 32
    assert isinstance(net.block_five_up.conv[0], nn.ConvTranspose3d)
    assert net.block_five_up.conv[0].kernel_size == (2, 2, 2) and net.block_five_up.conv[0].stride == (2, 2, 2)
    assert net.block_one_dw.conv[0].kernel_size == (2, 2, 2) and net.block_one_dw.conv[0].stride == (2, 2, 2)


def test_sdf_output_is_tanh_of_its_own_head():
    torch.manual_seed(1)
    net = VNet_dt(n_filters=4, normalization="none").eval()
    with torch.no_grad():
        net.out_conv.weight.zero_()
        net.out_conv.bias.fill_(0.5)
        dis, seg = net(torch.randn(1, 1, 16, 16, 16))
    torch.testing.assert_close(dis, torch.full_like(dis, 0.46211715726000974))  # tanh(0.5)
    assert seg.std() > 0


def test_heads_are_independent():
    torch.manual_seed(2)
    net = VNet_dt(n_filters=4, normalization="batchnorm").eval()
    x = torch.randn(1, 1, 16, 16, 32)
    with torch.no_grad():
        dis_a, seg_a = net(x)
        net.out_conv.weight.add_(0.1)  # the SDF head only
        dis_b, seg_b = net(x)
    assert not torch.allclose(dis_a, dis_b)
    torch.testing.assert_close(seg_a, seg_b, rtol=0, atol=0)

    net.zero_grad(set_to_none=True)
    _, seg = net(x)
    seg.sum().backward()
    assert net.out_conv.weight.grad is None and net.out_conv.bias.grad is None
    assert net.out_conv2.weight.grad.abs().sum() > 0
    assert net.block_nine.conv[0].weight.grad.abs().sum() > 0  # the shared trunk does get the gradient


def test_dropout_only_when_enabled_and_not_turned_off():
    torch.manual_seed(3)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        plain = VNet(n_filters=4, has_dropout=False)  # train mode: batch statistics, deterministic
        torch.testing.assert_close(plain(x), plain(x), rtol=0, atol=0)
        dropped = VNet(n_filters=4, has_dropout=True)
        assert [m.p for m in dropped.modules() if isinstance(m, nn.Dropout3d)] == [0.5]
        assert not torch.allclose(dropped(x), dropped(x))
        torch.testing.assert_close(dropped(x, turnoff_drop=True), dropped(x, turnoff_drop=True), rtol=0, atol=0)


def test_single_head_checkpoint_loads_into_the_dual_trunk():
    single = VNet(n_filters=4)
    dual = VNet_dt(n_filters=4)
    result = dual.load_state_dict(single.state_dict(), strict=False)
    assert result.missing_keys == ["out_conv2.weight", "out_conv2.bias"]
    assert result.unexpected_keys == []


@pytest.mark.parametrize("size", [(40, 40, 40), (16, 24, 16)])
def test_unsupported_spatial_size_raises_value_error_naming_it(size):
    with pytest.raises(ValueError, match=re.escape(str(size))):
        VNet_dt(n_filters=4)(torch.zeros(1, 1, *size))


def test_instancenorm_refuses_a_single_deepest_voxel():
    with pytest.raises(ValueError, match=re.escape("(16, 16, 16)")):
        VNet(n_filters=4, normalization="instancenorm")(torch.zeros(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="input channel"):
        VNet(n_filters=4, n_channels=2)(torch.zeros(1, 1, 16, 16, 16))
