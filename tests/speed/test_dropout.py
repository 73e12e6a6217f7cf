"""``speed.dropout``: ``PredrawnDropout`` draws the masks of ``nn.Dropout`` in the logical order, and
``draw_masks_ahead`` draws a later forward's masks now; the values and the random stream stay those of the plain
network."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks.unet_3D import unet_3D, unet_3D_ds, unet_3D_dt
from networks.vnet import VNet_dt
from speed import make_fast
from speed.dropout import (
    PredrawnDropout,
    can_draw_ahead,
    draw_masks_ahead,
    dropout_input_shapes,
    predraw_dropout,
)

CL = torch.channels_last_3d


@pytest.mark.parametrize("requires_grad", [False, True])
def test_channels_last_input_gets_the_contiguous_mask_and_random_stream(requires_grad):
    drop = PredrawnDropout(0.3).train()
    x = torch.randn(2, 8, 4, 5, 6)
    torch.manual_seed(11)
    expected, after = F.dropout(x, 0.3, True), torch.rand(3)
    torch.manual_seed(11)
    x_cl = x.contiguous(memory_format=CL).requires_grad_(requires_grad)
    got = drop(x_cl)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.rand(3), after, rtol=0, atol=0)
    if requires_grad:  # the gradient is the mask over 1 - p, as F.dropout's
        grad = torch.randn_like(x)
        (got * grad).sum().backward()
        plain = x.clone().requires_grad_()
        torch.manual_seed(11)
        (F.dropout(plain, 0.3, True) * grad).sum().backward()
        torch.testing.assert_close(x_cl.grad, plain.grad, rtol=0, atol=0)
    # plain F.dropout on the channels-last tensor would draw other masks (the reason for the module)
    torch.manual_seed(11)
    assert not torch.equal(F.dropout(x.contiguous(memory_format=CL), 0.3, True), expected)


def test_contiguous_input_is_plain_dropout_and_eval_mode_is_the_identity():
    drop = PredrawnDropout(0.3).train()
    x = torch.randn(2, 8, 4, 5, 6)
    torch.manual_seed(5)
    expected, after = F.dropout(x, 0.3, True), torch.rand(3)
    torch.manual_seed(5)
    torch.testing.assert_close(drop(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.rand(3), after, rtol=0, atol=0)
    drop.eval()
    state = torch.get_rng_state()
    assert drop(x) is x
    assert torch.equal(torch.get_rng_state(), state)


def test_predraw_dropout_swaps_plain_dropouts_only_and_keeps_the_state_dict():
    torch.manual_seed(0)
    net = unet_3D_dt(feature_scale=8).eval()
    keys = list(net.state_dict())
    assert not can_draw_ahead(net)
    assert predraw_dropout(net) == 2
    assert type(net.dropout1) is PredrawnDropout and type(net.dropout2) is PredrawnDropout
    assert net.dropout1.p == net.dropout2.p == 0.3
    assert not net.dropout1.training  # the mode is kept
    assert isinstance(net.dropout1, nn.Dropout)
    assert list(net.state_dict()) == keys
    assert can_draw_ahead(net)
    assert predraw_dropout(net) == 0  # nothing left to swap
    # Dropout3d (deep supervision, V-Net) is not an nn.Dropout: left as it is, and those nets cannot draw ahead
    ds = unet_3D_ds(feature_scale=16)
    assert predraw_dropout(ds) == 0 and not can_draw_ahead(ds)
    vnet = VNet_dt(n_filters=4, has_dropout=True)
    assert predraw_dropout(vnet) == 0 and not can_draw_ahead(vnet)
    with pytest.raises(ValueError, match="cannot draw its dropout masks ahead"):
        draw_masks_ahead(vnet, (1, 1, 32, 32, 32))


def test_dropout_input_shapes_are_the_bottleneck_and_the_last_decoder_map():
    net = unet_3D_dt(feature_scale=8)
    predraw_dropout(net)
    sites = dropout_input_shapes(net, (3, 1, 32, 48, 16))
    assert [d for d, _ in sites] == [net.dropout1, net.dropout2]
    assert [s for _, s in sites] == [(3, net.filters[4], 2, 3, 1), (3, net.filters[0], 32, 48, 16)]


def _predrawn(fast: bool, seed: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    net = unet_3D_dt(feature_scale=8).train()
    predraw_dropout(net)
    return make_fast(net) if fast else net


@pytest.mark.parametrize("fast", [False, True])
def test_masks_drawn_ahead_give_the_same_forward_and_random_stream(fast):
    net = _predrawn(fast)
    x = torch.randn(2, 1, 32, 32, 32)
    torch.manual_seed(21)
    expected = net(x)[1]
    expected_next = torch.randn(4)
    torch.manual_seed(21)
    draw_masks_ahead(net, x.shape)
    next_numbers = torch.randn(4)  # what runs between drawing and the forward gets the same numbers
    got = net(x)[1]
    torch.testing.assert_close(next_numbers, expected_next, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # the masks are used once: the next forward draws fresh ones
    assert not torch.equal(net(x)[1], got)


def test_masks_drawn_ahead_equal_those_of_the_plain_network():
    torch.manual_seed(4)
    plain = unet_3D_dt(feature_scale=8).train()
    net = copy.deepcopy(plain)
    predraw_dropout(net)
    x = torch.randn(2, 1, 32, 32, 32)
    torch.manual_seed(21)
    expected = plain(x)
    torch.manual_seed(21)
    draw_masks_ahead(net, x.shape)
    for got, want in zip(net(x), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("pieces", [[1, 1, 1, 1], [2, 2], [1, 3]])
def test_rows_drawn_ahead_are_consumed_in_pieces(pieces):
    drop = PredrawnDropout(0.3).train()
    x = torch.randn(4, 8, 4, 5, 6)
    torch.manual_seed(8)
    expected, after = F.dropout(x, 0.3, True), torch.rand(3)
    torch.manual_seed(8)
    drop.hold(drop.draw(x.shape, x.dtype, x.device))
    got = torch.cat([drop(piece) for piece in x.split(pieces)])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.rand(3), after, rtol=0, atol=0)
    assert drop._ahead is None  # all rows used: the next forward draws its own


@pytest.mark.parametrize("pieces", [[1, 1, 1, 1], [2, 2], [1, 3]])
def test_a_network_consumes_the_rows_drawn_ahead_in_pieces(pieces):
    # float64: convolutions of fewer rows round like those of the whole batch (float32 oneDNN ones of a single
    # row round differently, ~1e-5), so the pieces give the one forward bit for bit
    torch.manual_seed(4)
    net = unet_3D_dt(feature_scale=16).double().train()
    predraw_dropout(net)
    x = torch.randn(4, 1, 32, 16, 16, dtype=torch.float64)
    torch.manual_seed(8)
    expected, after = net(x), torch.rand(3)
    torch.manual_seed(8)
    draw_masks_ahead(net, x.shape, x.dtype)
    outputs = [net(piece) for piece in x.split(pieces)]
    torch.testing.assert_close(torch.rand(3), after, rtol=0, atol=0)
    for got, want in zip(zip(*outputs), expected):
        torch.testing.assert_close(torch.cat(got), want, rtol=0, atol=0)
    assert net.dropout1._ahead is None and net.dropout2._ahead is None


def test_masks_drawn_for_another_shape_raise():
    net = _predrawn(fast=False)
    draw_masks_ahead(net, (1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="drawn for an input"):
        net(torch.randn(2, 1, 32, 32, 32))  # more rows than drawn
    assert net.dropout1._ahead is None  # the failing dropout dropped its masks
    draw_masks_ahead(net, (2, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="drawn for an input"):
        net(torch.randn(2, 1, 16, 32, 32))  # another volume
    draw_masks_ahead(net, (3, 1, 32, 32, 32))
    net(torch.randn(2, 1, 32, 32, 32))
    with pytest.raises(ValueError, match=r"\(2 rows used\)"):
        net(torch.randn(2, 1, 32, 32, 32))  # only one row left
    with pytest.raises(ValueError, match="multiple of 16"):
        draw_masks_ahead(net, (1, 1, 30, 32, 32))
    with pytest.raises(ValueError):
        draw_masks_ahead(net, (1, 2, 32, 32, 32))  # the net takes one channel


def test_a_failed_forward_drops_every_mask_drawn_ahead():
    net = _predrawn(fast=False)
    draw_masks_ahead(net, (1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="drawn for an input"):
        net(torch.randn(2, 1, 32, 32, 32))
    net(torch.randn(2, 1, 32, 32, 32))  # draws its own masks


def test_eval_mode_draws_nothing_and_drops_masks_drawn_ahead():
    net = _predrawn(fast=False)
    x = torch.randn(1, 1, 32, 32, 32)
    net.eval()
    state = torch.get_rng_state()
    draw_masks_ahead(net, x.shape)
    assert torch.equal(torch.get_rng_state(), state)
    assert net.dropout1._ahead is None
    net.train()
    draw_masks_ahead(net, x.shape)
    net.eval()
    net(x)  # an eval forward uses no masks and drops those held
    assert net.dropout1._ahead is None and net.dropout2._ahead is None


def test_predrawn_network_trains_like_the_plain_one_bit_for_bit():
    """With contiguous activations and masks drawn ahead, outputs and gradients are the plain network's exactly."""
    torch.manual_seed(6)
    plain = unet_3D(feature_scale=16).train()
    net = copy.deepcopy(plain)
    predraw_dropout(net)
    x = torch.randn(2, 1, 32, 32, 32)
    grads = []
    for model, ahead in ((plain, False), (net, True)):
        torch.manual_seed(9)
        if ahead:
            draw_masks_ahead(model, x.shape)
        model(x).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for got, want in zip(*grads[::-1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
