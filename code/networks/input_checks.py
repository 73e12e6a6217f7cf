"""The input check shared by the 3-D networks: clear one-line errors instead of a crash inside ``torch.cat``."""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["SIDE_MULTIPLE", "check_volume"]

SIDE_MULTIPLE = 16
"""Four 2x downsamplings: every spatial side must be a multiple of 16."""


def check_volume(x: Tensor, in_channels: int, name: str, per_sample_norm: bool) -> None:
    """Raise a one-line ``ValueError`` for an input ``x`` the network ``name`` cannot take.

    Args:
        x: the input, expected ``(B, in_channels, D, H, W)`` with sides that are multiples of 16.
        in_channels: channels the network was built for.
        name: the network's name, for the message.
        per_sample_norm: the network uses InstanceNorm, which is undefined over a single deepest voxel.
    """
    if x.dim() != 5:
        raise ValueError(f"{name} expects a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{name} was built for {in_channels} input channel(s), got {x.shape[1]} in {tuple(x.shape)}")
    size = tuple(x.shape[2:])
    if any(s % SIDE_MULTIPLE for s in size):
        raise ValueError(
            f"{name} needs every spatial side to be a multiple of {SIDE_MULTIPLE} (4 downsamplings by 2), "
            f"got spatial size {size}; pad or crop the input"
        )
    if per_sample_norm and math.prod(size) <= SIDE_MULTIPLE**3:
        # InstanceNorm over a single deepest voxel is undefined (torch raises deep inside the model).
        raise ValueError(
            f"{name} with InstanceNorm needs more than one voxel at the deepest level, i.e. a spatial size "
            f"larger than {(SIDE_MULTIPLE,) * 3}, got {size}"
        )
