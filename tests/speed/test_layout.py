"""``speed.layout.to_channels_last``: channels-last weights and activations, contiguous outputs, the same network.

On CPU only float32 convolutions (oneDNN) follow the weights' layout; float64 ones always return contiguous
tensors, so the layout itself is checked in float32, to float rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from networks.unet_3D import unet_3D, unet_3D_dt
from speed.dropout import predraw_dropout
from speed.fused_norm import fuse_norm_relu
from speed.layout import to_channels_last

CL = torch.channels_last_3d


def _channels_last_net(net: torch.nn.Module) -> torch.nn.Module:
    """A copy with fused norms (which keep the layout; ``InstanceNorm3d`` makes activations contiguous again) in
    channels-last layout."""
    fast = copy.deepcopy(net)
    fuse_norm_relu(fast)
    return to_channels_last(fast)


def _record_layout(net: torch.nn.Module) -> list[bool]:
    """Whether the input of each of the net's dropouts was channels-last, one entry per call."""
    seen: list[bool] = []
    for dropout in (net.dropout1, net.dropout2):
        dropout.register_forward_pre_hook(
            lambda module, args: seen.append(not args[0].is_contiguous() and args[0].is_contiguous(memory_format=CL)))
    return seen


def test_weights_channels_last_state_dict_unchanged_and_loadable():
    torch.manual_seed(0)
    net = unet_3D_dt(feature_scale=8)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    fast = to_channels_last(copy.deepcopy(net))
    assert fast.conv1.conv1[0].weight.is_contiguous(memory_format=CL)
    assert all(p.is_contiguous(memory_format=CL) for p in fast.parameters() if p.dim() == 5)
    assert net.conv1.conv1[0].weight.is_contiguous()  # the copy changed, not the original
    assert list(fast.state_dict()) == list(state)
    for key, value in fast.state_dict().items():
        assert value.shape == state[key].shape and torch.equal(value, state[key])
    other = unet_3D_dt(feature_scale=8)
    to_channels_last(other).load_state_dict(state)  # a plain checkpoint loads into the channels-last weights
    assert other.conv1.conv1[0].weight.is_contiguous(memory_format=CL)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("input_layout", [torch.contiguous_format, CL])
def test_channels_last_network_computes_what_the_plain_one_does_with_contiguous_outputs(input_layout):
    torch.manual_seed(1)
    plain = unet_3D_dt(feature_scale=16).eval()
    fast = _channels_last_net(plain)
    layouts = _record_layout(fast)
    x = torch.randn(2, 1, 32, 32, 32)
    results = []
    for net, inp in ((plain, x), (fast, x.contiguous(memory_format=input_layout))):
        dis, logits = net(inp)
        (logits.square().mean() + dis.mean()).backward()
        assert dis.is_contiguous() and logits.is_contiguous()  # both outputs of the tuple
        results.append((dis.detach(), logits.detach(), [p.grad for p in net.parameters()]))
    assert layouts == [True, True]  # the activations inside were channels-last
    (dis, logits, grads), (plain_dis, plain_logits, plain_grads) = results[1], results[0]
    torch.testing.assert_close(dis, plain_dis, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, plain_logits, rtol=1e-4, atol=1e-4)
    for got, expected in zip(grads, plain_grads):
        # float32 sums over 2 x 32^3 voxels in another order (up to 0.4 % of the largest entry on AVX2; a bias before
        # InstanceNorm has a zero gradient plus rounding): the float64 test below is the exact check
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-2 * float(expected.abs().max()) + 1e-6)


def test_channels_last_network_in_float64_computes_what_the_plain_one_does():
    # float64: fused norm on contiguous activations (see the module docstring), only a wrong computation can differ
    torch.manual_seed(1)
    plain = unet_3D_dt(feature_scale=16).double().eval()
    fast = _channels_last_net(plain)
    x = torch.randn(1, 1, 32, 32, 32, dtype=torch.float64)
    outs = [net(x) for net in (plain, fast)]
    for got, expected in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_train_mode_needs_predrawn_dropout_for_the_plain_masks():
    """Channels-last activations get the plain masks only with ``predraw_dropout``: ``F.dropout`` fills its noise in
    memory order, so on its own it drops other elements for the same seed."""
    torch.manual_seed(2)
    plain = unet_3D(feature_scale=16).train()
    x = torch.randn(2, 1, 32, 32, 32)
    torch.manual_seed(7)
    expected, after = plain(x), torch.rand(3)
    fast = _channels_last_net(plain)
    layouts = _record_layout(fast)
    torch.manual_seed(7)
    assert not torch.allclose(fast(x), expected, rtol=1e-3, atol=1e-3)
    assert layouts == [True, True]
    predraw_dropout(fast)
    torch.manual_seed(7)
    got = fast(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.rand(3), after, rtol=0, atol=0)  # the random stream moved on as the plain one


def test_plain_dropout_of_a_channels_last_tensor_draws_other_masks():
    x = torch.randn(2, 8, 4, 5, 6)
    torch.manual_seed(11)
    expected = F.dropout(x, 0.3, True)
    torch.manual_seed(11)
    assert not torch.equal(F.dropout(x.contiguous(memory_format=CL), 0.3, True), expected)
