"""``mc_dropout_uncertainty(max_rows=...)`` (issue #7): chunks run in smaller forwards with the chunk's masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from networks.unet_3D import unet_3D_dt
from utils.uncertainty import mc_dropout_uncertainty


def _uncertainty(teacher: nn.Module, image: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    result = mc_dropout_uncertainty(teacher, image, passes=4, chunk=2, **kwargs)[0]
    return result, torch.rand(3)  # and where the random stream stands afterwards


def test_split_chunks_give_the_chunked_uncertainty_and_random_stream():
    torch.manual_seed(0)
    teacher = unet_3D_dt(feature_scale=16).train()
    image = torch.randn(2, 1, 32, 32, 32)
    chunked, after = _uncertainty(teacher, image)
    rows: list[int] = []
    teacher.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    split, split_after = _uncertainty(teacher, image, max_rows=2)
    assert rows == [2, 2, 2, 2]  # two chunks of 2 passes x batch 2, each in two forwards
    torch.testing.assert_close(split, chunked, rtol=0, atol=0)
    torch.testing.assert_close(split_after, after, rtol=0, atol=0)
    # one pass per forward *without* masks drawn for the chunk would draw other masks
    torch.manual_seed(3)
    per_pass = mc_dropout_uncertainty(teacher, image, passes=4, chunk=1)[0]
    assert not torch.equal(per_pass, chunked)


class _Counting(nn.Module):
    """A teacher without ``draw_dropout_masks`` that records its batch sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        return self.conv(x)


def test_teachers_that_cannot_draw_masks_ahead_ignore_max_rows():
    teacher = _Counting()
    mc_dropout_uncertainty(teacher, torch.randn(2, 1, 4, 4, 4), passes=4, chunk=2, max_rows=2)
    assert teacher.rows == [4, 4]


def test_negative_max_rows_raises_value_error():
    with pytest.raises(ValueError, match="max_rows"):
        mc_dropout_uncertainty(_Counting(), torch.randn(1, 1, 4, 4, 4), passes=2, max_rows=-1)
