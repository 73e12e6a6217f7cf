"""The sliding-window fast path (issue #7): a channels-last, fused copy of the network; argmax by comparisons."""

from __future__ import annotations

import torch

from networks.unet_3D import unet_3D_dt
from utils.sliding_window import argmax_labels, predict_volume_labels, sliding_window_probabilities


def test_fast_path_gives_the_plain_probabilities_and_leaves_the_network_as_it_was():
    torch.manual_seed(0)
    net = unet_3D_dt(feature_scale=16)
    net.train()
    volume = torch.randn(40, 36, 30)
    plain, _ = sliding_window_probabilities(net, volume, patch=32, stride_xy=16, stride_z=16)
    fast, _ = sliding_window_probabilities(net, volume, patch=32, stride_xy=16, stride_z=16, fast=True)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert net.training and net.conv1.conv1[0].weight.is_contiguous()
    assert not any(getattr(m, "fused", False) for m in net.modules())
    labels = predict_volume_labels(net, volume, patch=32, stride_xy=16, stride_z=16, fast=True)
    assert labels.shape == (40, 36, 30)


def testargmax_labels_equals_torch_argmax_including_ties():
    g = torch.Generator().manual_seed(1)
    probabilities = torch.randint(0, 3, (4, 5, 6, 7), generator=g).float()  # many exact ties
    expected = torch.argmax(probabilities, dim=0).to(torch.uint8)
    assert torch.equal(argmax_labels(probabilities), expected)
    assert torch.equal(argmax_labels(probabilities[:1]), torch.zeros(5, 6, 7, dtype=torch.uint8))
