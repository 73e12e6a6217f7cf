"""The segmentation-logits rule shared by training, validation, testing and uncertainty."""

from __future__ import annotations

import pytest
import torch

from networks.net_factory_3d import net_factory_3d
from networks.outputs import segmentation_logits


@pytest.mark.parametrize(
    "name, expected_index",
    [("unet_3D", None), ("unet_3D_dt", 1), ("unet_3D_ds", 0)],
)
def test_the_full_resolution_segmentation_logits_are_picked(name: str, expected_index: int | None) -> None:
    net = net_factory_3d(name, in_chns=1, class_num=2, feature_scale=16).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 32, 32, 32))
    expected = out if expected_index is None else out[expected_index]
    assert segmentation_logits(out) is expected
    assert segmentation_logits(out).shape == (1, 2, 32, 32, 32)


def test_unreadable_outputs_are_refused() -> None:
    with pytest.raises(ValueError, match="0 elements"):
        segmentation_logits(())
    with pytest.raises(ValueError, match="dict"):
        segmentation_logits({"a": torch.zeros(1)})
