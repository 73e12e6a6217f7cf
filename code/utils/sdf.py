"""Ground-truth signed distance maps in the DTC convention (Luo et al. 2021; SPEC section 3, paper variant).

For each sample of a binary mask (foreground = non-zero):

    d_out = EDT(background)   distance of each background voxel to the nearest foreground voxel (0 inside)
    d_in  = EDT(foreground)   distance of each foreground voxel to the nearest background voxel (0 outside)
    sdf   = (d_out - min d_out) / (max d_out - min d_out) - (d_in - min d_in) / (max d_in - min d_in)
    sdf   = 0 on the inner boundary (foreground voxels with a background face neighbour)

so the map lies in [-1, 1]: negative inside, positive outside, 0 on the object's surface. Both minima are 0
whenever the sample holds both classes. Voxels beyond the array edge count as neither class: the edge is
not a surface.

Degenerate samples:
    * empty mask (no foreground): all zeros (as DTC);
    * full mask (no background): all -1. There is no surface inside the volume, every voxel is inside,
      and ``sigmoid(-k * sdf)`` then gives back the mask (DTC would divide 0 by 0 here).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

__all__ = ["compute_sdf", "compute_sdf_torch", "inner_boundary"]


def inner_boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with at least one background face neighbour (6-connectivity in 3-D).

    The same set as scikit-image's ``find_boundaries(mask, mode="inner")``: the array edge is not a boundary.

    Args:
        mask: one sample, any number of axes, bool (or castable).
    Returns:
        bool array of the same shape.
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    # border_value=1: outside the array counts as foreground, so the edge itself is never a boundary.
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=1)
    return mask & ~eroded


def _normalised(distance: np.ndarray) -> np.ndarray:
    low, high = distance.min(), distance.max()
    return (distance - low) / (high - low)


def _sample_sdf(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.float32)
    if mask.all():
        return np.full(mask.shape, -1.0, dtype=np.float32)
    outside = ndimage.distance_transform_edt(~mask)
    inside = ndimage.distance_transform_edt(mask)
    sdf = _normalised(outside) - _normalised(inside)
    sdf[inner_boundary(mask)] = 0.0
    return sdf.astype(np.float32)


def compute_sdf(mask: np.ndarray, out_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Normalised signed distance map of each sample of a batch of binary masks (DTC convention, see module).

    Args:
        mask: (B, D, H, W) bool or integer; non-zero is foreground. Any number of spatial axes works.
        out_shape: the expected output shape, kept for DTC's ``compute_sdf(gt, out_shape)`` call; must equal
            ``mask.shape`` when given.
    Returns:
        (B, D, H, W) float32 in [-1, 1].
    Raises:
        ValueError: if ``mask`` has fewer than 2 axes or ``out_shape`` differs from its shape.
    """
    mask = np.asarray(mask)
    if mask.ndim < 2:
        raise ValueError(f"mask must be (B, D, H, W) (batch first), but found shape {mask.shape}")
    if out_shape is not None and tuple(out_shape) != mask.shape:
        raise ValueError(f"out_shape {tuple(out_shape)} must equal the mask's shape {mask.shape}")
    mask = mask != 0
    if mask.shape[0] == 0:
        return np.zeros(mask.shape, dtype=np.float32)
    return np.stack([_sample_sdf(sample) for sample in mask]).astype(np.float32, copy=False)


def compute_sdf_torch(label: Tensor) -> Tensor:
    """:func:`compute_sdf` of a label tensor, returned as float32 on the label's device (computed on the CPU).

    Args:
        label: (B, D, H, W) integer or bool; non-zero is foreground.
    Returns:
        (B, D, H, W) float32 tensor in [-1, 1].
    """
    sdf = compute_sdf(label.detach().cpu().numpy())
    return torch.from_numpy(sdf).to(label.device)
