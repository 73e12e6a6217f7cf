"""Tests for networks/unet_3D.py: published keys, size, init, outputs, golden values of the original code."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from networks.unet_3D import unet_3D, unet_3D_ds, unet_3D_dt, unet_3D_dv_semi


def _count_by_hand(filters: list[int], in_channels: int, n_classes: int) -> int:
    """Parameters of the published trunk from its description: k3 convs with bias, no norm parameters."""

    def conv(cin: int, cout: int, k: int = 3) -> int:
        return cin * cout * k**3 + cout

    f = filters
    encoder = [(in_channels, f[0]), (f[0], f[1]), (f[1], f[2]), (f[2], f[3]), (f[3], f[4])]
    decoder = [(f[4] + f[3], f[3]), (f[3] + f[2], f[2]), (f[2] + f[1], f[1]), (f[1] + f[0], f[0])]
    blocks = sum(conv(cin, cout) + conv(cout, cout) for cin, cout in encoder + decoder)
    return blocks + conv(f[0], n_classes, k=1)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def default_net() -> unet_3D_dt:
    torch.manual_seed(0)
    return unet_3D_dt()


def test_parameter_count_matches_the_published_5_884_050(default_net):
    assert _n_params(default_net) == 5_884_050
    assert _count_by_hand([16, 32, 64, 128, 256], 1, 2) == 5_884_050


def test_feature_scale_8_halves_every_filter_count():
    net = unet_3D(feature_scale=8, n_classes=3, in_channels=2)
    assert net.conv1.conv1[0].out_channels == 8 and net.center.conv2[0].out_channels == 128
    assert _n_params(net) == _count_by_hand([8, 16, 32, 64, 128], 2, 3)


def test_state_dict_keys_and_shapes_match_the_published_checkpoint_list(default_net, golden_dir: Path):
    listing = golden_dir.parent / "unet_3D_dt_state_dict.txt"
    if not listing.is_file():
        pytest.skip(f"{listing} not found")
    expected = {}
    for line in listing.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split(maxsplit=1)
        expected[key] = tuple(int(s) for s in re.findall(r"\d+", shape))
    assert len(expected) == 38
    got = {k: tuple(v.shape) for k, v in default_net.state_dict().items()}
    assert got == expected
    assert all(v.dtype == torch.float32 for v in default_net.state_dict().values())


def test_norm_is_instance_norm_without_affine_and_is_batchnorm_false_removes_it(default_net):
    norms = [m for m in default_net.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert len(norms) == 18  # 9 blocks x 2 convs
    assert all(not m.affine and not m.track_running_stats for m in norms)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in default_net.modules())
    bare = unet_3D_dt(feature_scale=8, is_batchnorm=False)
    assert not any(isinstance(m, nn.InstanceNorm3d) for m in bare.modules())
    assert bare.state_dict().keys() == unet_3D_dt(feature_scale=8).state_dict().keys()


def test_conv_weights_are_kaiming_normal_fan_in(default_net):
    weight = default_net.center.conv2[0].weight.detach()  # 256 * 256 * 27 values, fan_in = 256 * 27
    expected_std = math.sqrt(2.0 / (256 * 27))
    assert abs(weight.std().item() / expected_std - 1) < 0.01
    assert abs(weight.mean().item()) < 0.01 * expected_std
    final = default_net.final.weight.detach()  # fan_in = 16: a default torch init would have std 1/sqrt(48)
    assert abs(final.std().item() - math.sqrt(2.0 / 16)) < 0.15


def test_dt_output_is_tanh_of_the_same_logits_as_unet_3D():
    torch.manual_seed(1)
    dt = unet_3D_dt(feature_scale=8, n_classes=3).eval()
    plain = unet_3D(feature_scale=8, n_classes=3).eval()
    plain.load_state_dict(dt.state_dict(), strict=True)
    x = torch.randn(2, 1, 16, 32, 16)
    with torch.no_grad():
        dis, logits = dt(x)
        ref = plain(x)
    assert dis.shape == logits.shape == (2, 3, 16, 32, 16)
    torch.testing.assert_close(logits, ref)
    torch.testing.assert_close(dis, torch.tanh(ref))


def test_dropout_is_active_in_train_mode_only():
    torch.manual_seed(2)
    net = unet_3D_dt(feature_scale=8)
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert [m.p for m in drops] == [0.3, 0.3]
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        a, b = net(x)[1], net(x)[1]
        assert not torch.allclose(a, b)
        net.eval()
        torch.testing.assert_close(net(x)[1], net(x)[1], rtol=0, atol=0)


def test_outputs_match_the_original_code_on_golden_values(golden_dir: Path):
    golden = torch.load(golden_dir / "unet_3D_dt_golden.pt", weights_only=True)
    net = unet_3D_dt(n_classes=2, in_channels=1)
    net.load_state_dict(golden["state_dict"], strict=True)
    net.eval()
    with torch.no_grad():
        dis, logits = net(golden["input"])
        dis64, logits64 = net.double()(golden["input"].double())
    # The golden values are float32 results of the original code: they carry its rounding (about 3e-5 from the
    # float64 result on logits of up to 5.5), and float32 on another instruction set (AVX2 instead of AVX-512) rounds
    # differently by as much again. A wrong layer or weight mapping moves the outputs by orders of magnitude more.
    torch.testing.assert_close(logits, golden["logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dis, golden["dis"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits64, golden["logits"].double(), rtol=0, atol=5e-5)
    torch.testing.assert_close(dis64, golden["dis"].double(), rtol=0, atol=5e-5)


@pytest.mark.parametrize("size", [(40, 40, 40), (32, 32, 40), (16, 16, 16)])
def test_unsupported_spatial_size_raises_value_error_naming_it(size):
    net = unet_3D_dt(feature_scale=8)
    with pytest.raises(ValueError, match=re.escape(str(size))):
        net(torch.zeros(1, 1, *size))


def test_smallest_sizes_with_more_than_one_bottleneck_voxel_work():
    net = unet_3D_dt(feature_scale=16).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 16, 16, 32))[0].shape == (1, 2, 16, 16, 32)
    bare = unet_3D(feature_scale=16, is_batchnorm=False).eval()
    with torch.no_grad():
        assert bare(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_wrong_rank_channels_or_feature_scale_raise_value_error():
    net = unet_3D(feature_scale=16, in_channels=2)
    with pytest.raises(ValueError, match="input channel"):
        net(torch.zeros(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        net(torch.zeros(2, 32, 32, 32))
    with pytest.raises(ValueError, match="feature_scale"):
        unet_3D(feature_scale=0)
    with pytest.raises(ValueError, match="feature_scale"):
        unet_3D(feature_scale=128)


def test_deep_supervision_variant_returns_four_full_resolution_maps():
    assert unet_3D_dv_semi is unet_3D_ds
    torch.manual_seed(3)
    net = unet_3D_ds(feature_scale=16, n_classes=3)
    assert [m.p for m in net.modules() if isinstance(m, nn.Dropout3d)] == [0.5, 0.3, 0.2, 0.1]
    x = torch.randn(2, 1, 32, 16, 32)
    net.eval()
    with torch.no_grad():
        outs = net(x)
    assert isinstance(outs, tuple) and len(outs) == 4
    assert all(o.shape == (2, 3, 32, 16, 32) for o in outs)
    assert not torch.allclose(outs[0], outs[3])
    # The coarsest head reads the 1/8 decoder map (up_concat4): a 1x1 conv, then x8 trilinear upsampling.
    with torch.no_grad():
        conv1, conv2, conv3, conv4, center = net._encode(x)
        up4 = net.up_concat4(conv4, center)
        expected = nn.functional.interpolate(net.dsv4.dsv[0](up4), scale_factor=8, mode="trilinear")
    torch.testing.assert_close(outs[3], expected)
