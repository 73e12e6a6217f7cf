"""Tests for networks/net_factory_3d.py: names, argument pass-through, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from networks.net_factory_3d import NETWORKS_3D, net_factory_3d, width_kwargs
from networks.unet_3D import unet_3D, unet_3D_ds, unet_3D_dt
from networks.vnet import VNet, VNet_dt


@pytest.mark.parametrize(
    ("name", "cls"),
    [("unet_3D", unet_3D), ("unet_3D_dt", unet_3D_dt), ("unet_3D_ds", unet_3D_ds), ("unet_3D_dv_semi", unet_3D_ds)],
)
def test_unet_names_build_their_class_with_channels_classes_and_feature_scale(name, cls):
    net = net_factory_3d(name, in_chns=2, class_num=3, feature_scale=16)
    assert type(net) is cls
    assert net.conv1.conv1[0].in_channels == 2
    assert net.conv1.conv1[0].out_channels == 4  # 64 / 16
    heads = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m.kernel_size == (1, 1, 1)]
    assert heads and all(m.out_channels == 3 for m in heads)


def test_default_is_the_published_unet_3D_size():
    net = net_factory_3d("unet_3D_dt")
    assert sum(p.numel() for p in net.parameters()) == 5_884_050
    assert all(p.device.type == "cpu" for p in net.parameters())


@pytest.mark.parametrize(("name", "cls"), [("vnet", VNet), ("vnet_dt", VNet_dt)])
def test_vnet_names_default_to_batchnorm_with_dropout_and_accept_overrides(name, cls):
    net = net_factory_3d(name, in_chns=1, class_num=2, n_filters=4)
    assert type(net) is cls and net.has_dropout
    assert any(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    bare = net_factory_3d(name, class_num=3, n_filters=4, normalization="none", has_dropout=False)
    assert not bare.has_dropout
    assert not any(isinstance(m, nn.BatchNorm3d) for m in bare.modules())
    out = bare.eval()(torch.zeros(1, 1, 16, 16, 16))
    outs = out if isinstance(out, tuple) else (out,)
    assert [o.shape for o in outs] == [(1, 3, 16, 16, 16)] * (2 if name == "vnet_dt" else 1)


def test_required_names_are_registered():
    assert {"unet_3D", "unet_3D_dt", "unet_3D_ds", "vnet", "vnet_dt"} <= set(NETWORKS_3D)


def test_unknown_name_raises_value_error_listing_valid_names():
    with pytest.raises(ValueError, match="unet_3d_DT") as info:
        net_factory_3d("unet_3d_DT")
    for name in ("unet_3D", "unet_3D_dt", "unet_3D_ds", "vnet", "vnet_dt"):
        assert repr(name) in str(info.value)


def test_argument_of_another_network_raises_type_error():
    with pytest.raises(TypeError, match="feature_scale"):
        net_factory_3d("vnet", feature_scale=8)


@pytest.mark.parametrize("net_type", ["vnet", "vnet_dt", "mcnet3d_v2"])
def test_one_width_divisor_sets_the_vnets_first_stage_filters(net_type):
    assert width_kwargs(net_type, 4) == {"n_filters": 16}  # the published V-Net
    half = net_factory_3d(net_type, **width_kwargs(net_type, 8))
    full = net_factory_3d(net_type, **width_kwargs(net_type, 4))
    first = [m for m in half.modules() if isinstance(m, torch.nn.Conv3d)][0]
    assert first.out_channels == 8
    n_half, n_full = (sum(p.numel() for p in n.parameters()) for n in (half, full))
    assert 3.5 < n_full / n_half < 4.1  # convolutions dominate: about four times fewer weights at half width


def test_width_divisor_is_passed_as_is_to_the_unets_and_checked():
    assert width_kwargs("unet_3D_dt", 8) == {"feature_scale": 8}
    for bad in (0, 65):
        with pytest.raises(ValueError, match="feature_scale must be in 1..64"):
            width_kwargs("vnet", bad)
