"""``speed.prepare_inference`` for the sliding window: a fast, changed copy of the network gives the plain
probabilities, and the caller's network stays as it was; argmax by comparisons equals ``torch.argmax``."""

from __future__ import annotations

import torch

from networks.unet_3D import unet_3D_dt
from speed import SpeedOptions, prepare_inference
from speed.fused_norm import FusedConvNormReLU
from utils.sliding_window import argmax_labels, predict_volume_labels, sliding_window_probabilities


def test_fast_network_gives_the_plain_probabilities_and_leaves_the_network_as_it_was():
    torch.manual_seed(0)
    net = unet_3D_dt(feature_scale=16)
    net.train()
    keys = list(net.state_dict())
    volume = torch.randn(40, 36, 30)
    plain, _ = sliding_window_probabilities(net, volume, patch=32, stride_xy=16, stride_z=16)
    inference = prepare_inference(net, SpeedOptions(fast_network=True), "cpu")
    assert inference.net is not net
    assert any(isinstance(m, FusedConvNormReLU) for m in inference.net.modules())
    assert list(inference.net.state_dict()) == keys
    with inference.around_case():
        fast, _ = sliding_window_probabilities(inference.net, volume, patch=32, stride_xy=16, stride_z=16)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert net.training and net.conv1.conv1[0].weight.is_contiguous()
    assert not any(isinstance(m, FusedConvNormReLU) for m in net.modules())
    labels = predict_volume_labels(inference.net, volume, patch=32, stride_xy=16, stride_z=16)
    assert labels.shape == (40, 36, 30)
    expected = predict_volume_labels(net, volume, patch=32, stride_xy=16, stride_z=16)
    assert (labels != expected).mean() < 1e-3  # only voxels at a near tie may flip


def test_without_the_fast_network_the_network_itself_is_used():
    net = unet_3D_dt(feature_scale=16)
    inference = prepare_inference(net, SpeedOptions(keep_freed_memory=0), "cpu")
    assert inference.net is net
    assert inference.notes == []


def testargmax_labels_equals_torch_argmax_including_ties():
    g = torch.Generator().manual_seed(1)
    probabilities = torch.randint(0, 3, (4, 5, 6, 7), generator=g).float()  # many exact ties
    expected = torch.argmax(probabilities, dim=0).to(torch.uint8)
    assert torch.equal(argmax_labels(probabilities), expected)
    assert torch.equal(argmax_labels(probabilities[:1]), torch.zeros(5, 6, 7, dtype=torch.uint8))
