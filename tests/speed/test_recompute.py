"""``speed.recompute.keep_activations_as_sources`` (and ``speed.make_fast``): activations rebuilt in the backward
give the gradients of the kept ones, bit for bit; the whole fast network computes what the plain one does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from networks.unet_3D import UnetUp3_CT, unet_3D_ds, unet_3D_dt
from networks.vnet import VNet_dt
from speed import make_fast
from speed.dropout import predraw_dropout
from speed.fused_norm import FusedConvNormReLU, fuse_norm_relu
from speed.layout import to_channels_last
from speed.recompute import RecomputedUpConcat, keep_activations_as_sources

CL = torch.channels_last_3d


def _step(net: nn.Module, x: torch.Tensor, seed: int = 7) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs and parameter gradients of one train-or-eval forward and backward, dropout seeded."""
    torch.manual_seed(seed)
    outputs = net(x)
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    sum(o.square().mean() for o in outputs).backward()
    return [o.detach() for o in outputs], [p.grad.clone() for p in net.parameters()]


def test_swaps_the_decoder_blocks_and_keeps_the_state_dict_keys():
    torch.manual_seed(0)
    net = unet_3D_dt(feature_scale=8)
    keys = list(net.state_dict())
    fast = copy.deepcopy(net)
    fuse_norm_relu(fast)
    assert keep_activations_as_sources(fast) is fast
    assert sum(type(m) is RecomputedUpConcat for m in fast.modules()) == 4
    assert not any(type(m) is UnetUp3_CT for m in fast.modules())
    assert isinstance(fast.up_concat1, UnetUp3_CT)  # still the published block, for isinstance checks
    assert list(fast.state_dict()) == keys
    fast.load_state_dict(net.state_dict())


def test_a_network_without_fused_blocks_is_returned_unchanged():
    net = unet_3D_dt(feature_scale=8)
    before = [type(m) for m in net.modules()]
    assert keep_activations_as_sources(net) is net
    assert [type(m) for m in net.modules()] == before
    assert not net._forward_pre_hooks and not net._forward_hooks


@pytest.mark.parametrize("channels_last", [False, True])
def test_rebuilt_activations_give_the_kept_ones_gradients_bit_for_bit(channels_last):
    torch.manual_seed(1)
    kept = unet_3D_dt(feature_scale=16).train()
    predraw_dropout(kept)  # dropout outputs are rebuilt from their masks too
    fuse_norm_relu(kept)
    if channels_last:
        to_channels_last(kept)
    rebuilt = keep_activations_as_sources(copy.deepcopy(kept))
    x = torch.randn(2, 1, 32, 32, 32)
    expected_out, expected_grads = _step(kept, x)
    got_out, got_grads = _step(rebuilt, x)
    for got, expected in zip(got_out + got_grads, expected_out + expected_grads):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_the_hooks_are_left_after_every_forward_even_a_failing_one():
    net = unet_3D_dt(feature_scale=16).train()
    predraw_dropout(net)
    make_fast(net)

    def no_hooks_active() -> bool:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is None

    net(torch.randn(1, 1, 32, 32, 32))
    assert no_hooks_active()
    with torch.no_grad():
        net(torch.randn(1, 1, 32, 32, 32))
    assert no_hooks_active()
    with pytest.raises(ValueError):
        net(torch.randn(1, 1, 30, 32, 32))  # not a multiple of 16
    assert no_hooks_active()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_make_fast_network_computes_what_the_plain_one_does(mode):
    # float64, so that only a wrong computation (not float rounding through 18 norms) can differ; float64
    # convolutions on CPU return contiguous activations, so this checks the fused and rebuilt steps, and the
    # float32 test below the channels-last ones
    torch.manual_seed(3)
    plain = unet_3D_dt(feature_scale=16).double().train(mode == "train")
    fast = copy.deepcopy(plain)
    predraw_dropout(fast)  # channels-last activations get the plain masks
    assert make_fast(fast) is fast
    assert fast.conv1.conv1[0].weight.is_contiguous(memory_format=CL)
    assert sum(isinstance(m, FusedConvNormReLU) for m in fast.modules()) == 18
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    plain_out, plain_grads = _step(plain, x)
    fast_out, fast_grads = _step(fast, x)
    assert all(o.is_contiguous() for o in fast_out)
    for got, expected in zip(fast_out, plain_out):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for got, expected in zip(fast_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_make_fast_network_in_float32_trains_like_the_plain_one_to_float_rounding():
    torch.manual_seed(3)
    plain = unet_3D_dt(feature_scale=16).train()
    fast = copy.deepcopy(plain)
    predraw_dropout(fast)
    make_fast(fast)
    x = torch.randn(2, 1, 32, 32, 32)
    plain_out, plain_grads = _step(plain, x)
    fast_out, fast_grads = _step(fast, x)
    for got, expected in zip(fast_out, plain_out):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for got, expected in zip(fast_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)


def test_deep_supervision_net_made_fast_computes_what_the_plain_one_does():
    torch.manual_seed(5)
    plain = unet_3D_ds(feature_scale=16).double().eval()
    fast = make_fast(copy.deepcopy(plain))
    x = torch.randn(1, 1, 32, 32, 32, dtype=torch.float64)
    plain_out, plain_grads = _step(plain, x)
    fast_out, fast_grads = _step(fast, x)
    for got, expected in zip(fast_out + fast_grads, plain_out + plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_instance_norm_vnet_made_fast_computes_what_the_plain_one_does():
    """The V-Net's single-stage ``Sequential(Conv3d, InstanceNorm3d, ReLU)`` blocks are fused too."""
    torch.manual_seed(6)
    plain = VNet_dt(n_filters=4, normalization="instancenorm", has_dropout=True).double().train()
    fast = make_fast(copy.deepcopy(plain))
    assert any(isinstance(m, FusedConvNormReLU) for m in fast.modules())
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    plain_out, plain_grads = _step(plain, x)
    fast_out, fast_grads = _step(fast, x)
    for got, expected in zip(fast_out + fast_grads, plain_out + plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
