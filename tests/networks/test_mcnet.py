"""Tests for networks/mcnet.py: MC-Net+'s ``MCNet3d_v2`` (one V-Net encoder, three decoders)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from networks.mcnet import MCNet3d_v2, VNetDecoder
from networks.net_factory_3d import net_factory_3d
from networks.outputs import segmentation_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _released_keys(n_stages_enc=(1, 2, 3, 3, 3), n_stages_dec=(3, 3, 2, 1)) -> list[str]:
    """The ``state_dict`` keys of ycwu1997/MC-Net's ``MCNet3d_v2(normalization="batchnorm")``, from its layers.

    A conv stage is ``[Conv3d, BatchNorm3d, ReLU]`` (indices 3i, 3i+1); a downsampling or a transposed upsampling is
    ``[conv, BN, ReLU]`` (0, 1); an interpolating upsampling ``[Upsample, Conv3d, BN, ReLU]`` (1, 2).
    """

    def stage(prefix: str, n: int) -> list[str]:
        keys = []
        for i in range(n):
            keys += [f"{prefix}.conv.{3 * i}.weight", f"{prefix}.conv.{3 * i}.bias"]
            keys += [f"{prefix}.conv.{3 * i + 1}.{b}" for b in _BN]
        return keys

    def conv_bn(prefix: str, conv: int) -> list[str]:
        return [f"{prefix}.conv.{conv}.weight", f"{prefix}.conv.{conv}.bias"] + [f"{prefix}.conv.{conv + 1}.{b}" for b in _BN]

    names = ["one", "two", "three", "four", "five"]
    keys = []
    for name, n in zip(names, n_stages_enc):
        keys += stage(f"encoder.block_{name}", n)
        if name != "five":
            keys += conv_bn(f"encoder.block_{name}_dw", 0)
    for d, conv in ((1, 0), (2, 1), (3, 1)):
        for up, block, n in zip(("five", "six", "seven", "eight"), ("six", "seven", "eight", "nine"), n_stages_dec):
            keys += conv_bn(f"decoder{d}.block_{up}_up", conv)
            keys += stage(f"decoder{d}.block_{block}", n)
        keys += [f"decoder{d}.out_conv.weight", f"decoder{d}.out_conv.bias"]
    return keys


def _count_by_hand(n: int, in_channels: int, n_classes: int) -> int:
    """Parameters from the description, with BatchNorm (2 per channel): k3 stages, k2 down, k2 / k3 up, 1x1 heads."""

    def conv(cin: int, cout: int, k: int) -> int:
        return cin * cout * k**3 + cout + 2 * cout

    def stage(n_convs: int, c: int, cin: int | None = None) -> int:
        return conv(cin or c, c, 3) + (n_convs - 1) * conv(c, c, 3)

    encoder = stage(1, n, in_channels) + stage(2, 2 * n) + stage(3, 4 * n) + stage(3, 8 * n) + stage(3, 16 * n)
    encoder += conv(n, 2 * n, 2) + conv(2 * n, 4 * n, 2) + conv(4 * n, 8 * n, 2) + conv(8 * n, 16 * n, 2)
    body = stage(3, 8 * n) + stage(3, 4 * n) + stage(2, 2 * n) + stage(1, n) + n * n_classes + n_classes
    ups = [(16 * n, 8 * n), (8 * n, 4 * n), (4 * n, 2 * n), (2 * n, n)]
    transposed = body + sum(conv(a, b, 2) for a, b in ups)
    interpolating = body + sum(conv(a, b, 3) for a, b in ups)
    return encoder + transposed + 2 * interpolating


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_default_network_has_the_parameters_of_one_encoder_and_three_decoders():
    net = MCNet3d_v2()
    assert _n_params(net) == _count_by_hand(16, 1, 2) == 15_246_566
    tiny = MCNet3d_v2(n_channels=2, n_classes=3, n_filters=4)
    assert _n_params(tiny) == _count_by_hand(4, 2, 3)


def test_state_dict_keys_are_those_of_the_released_mcnet3d_v2():
    keys = list(MCNet3d_v2(n_filters=4).state_dict())
    assert keys == _released_keys()
    assert len(keys) == 391


@pytest.mark.parametrize("classes", [2, 3])
def test_forward_returns_the_three_decoders_logits_with_the_input_size(classes):
    torch.manual_seed(0)
    net = MCNet3d_v2(n_classes=classes, n_filters=4, has_dropout=True)
    x = torch.randn(2, 1, 32, 16, 48)
    out = net(x)
    assert isinstance(out, tuple) and len(out) == 3
    assert all(z.shape == (2, classes, 32, 16, 48) for z in out)
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[1], out[2])


def test_the_decoders_upsample_by_transposed_conv_trilinear_and_nearest_in_that_order():
    net = MCNet3d_v2(n_filters=4)
    first = [d.block_five_up.conv[0] for d in (net.decoder1, net.decoder2, net.decoder3)]
    assert isinstance(first[0], nn.ConvTranspose3d)
    assert isinstance(first[1], nn.Upsample) and first[1].mode == "trilinear" and first[1].align_corners
    assert isinstance(first[2], nn.Upsample) and first[2].mode == "nearest"
    assert [d.upsampling for d in (net.decoder1, net.decoder2, net.decoder3)] == ["transposed", "trilinear", "nearest"]


def test_prediction_reads_the_first_decoder():
    net = MCNet3d_v2(n_filters=4).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        out = net(x)
        torch.testing.assert_close(segmentation_logits(out), out[0])


def test_dropout_acts_in_train_mode_only_and_turnoff_drop_skips_it():
    torch.manual_seed(0)
    net = MCNet3d_v2(n_filters=4, has_dropout=True, normalization="none")
    x = torch.randn(1, 1, 32, 32, 32)
    assert not torch.equal(net(x)[0], net(x)[0])
    torch.testing.assert_close(net(x, turnoff_drop=True), net(x, turnoff_drop=True))
    net.eval()
    torch.testing.assert_close(net(x), net(x, turnoff_drop=True))


def test_factory_builds_it_with_batchnorm_and_dropout_as_mcnet_plus_trains():
    net = net_factory_3d("mcnet3d_v2", in_chns=2, class_num=3, n_filters=4)
    assert type(net) is MCNet3d_v2 and net.has_dropout and net.encoder.has_dropout
    assert any(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    assert net.encoder.block_one.conv[0].in_channels == 2
    assert all(d.out_conv.out_channels == 3 for d in (net.decoder1, net.decoder2, net.decoder3))


@pytest.mark.parametrize("size", [(24, 32, 32), (32, 32, 40), (8, 16, 16)])
def test_sides_that_are_not_multiples_of_16_are_refused(size):
    with pytest.raises(ValueError, match=r"multiple of 16.*" + str(size).replace("(", r"\(").replace(")", r"\)")):
        MCNet3d_v2(n_filters=4)(torch.zeros(1, 1, *size))


def test_ill_inputs_and_options_raise_value_errors():
    with pytest.raises(ValueError, match="2 input channel"):
        MCNet3d_v2(n_channels=2, n_filters=4)(torch.zeros(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        MCNet3d_v2(n_filters=4)(torch.zeros(1, 32, 32, 32))
    with pytest.raises(ValueError, match="deepest level"):
        MCNet3d_v2(n_filters=4, normalization="instancenorm")(torch.zeros(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="normalization must be one of"):
        MCNet3d_v2(normalization="layernorm")
    with pytest.raises(ValueError, match="n_filters"):
        MCNet3d_v2(n_filters=0)
    with pytest.raises(ValueError, match=r"upsampling must be one of .*'bicubic'"):
        VNetDecoder(2, 4, "none", False, "bicubic")
