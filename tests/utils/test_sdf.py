"""Ground-truth SDF (DTC convention) against a brute-force distance computation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from utils.sdf import compute_sdf, compute_sdf_torch, inner_boundary


def _brute_boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background face neighbour inside the array."""
    out = np.zeros_like(mask)
    for idx in itertools.product(*(range(s) for s in mask.shape)):
        if not mask[idx]:
            continue
        for axis, step in itertools.product(range(mask.ndim), (-1, 1)):
            nb = list(idx)
            nb[axis] += step
            if 0 <= nb[axis] < mask.shape[axis] and not mask[tuple(nb)]:
                out[idx] = True
    return out


def _brute_sdf(mask: np.ndarray) -> np.ndarray:
    """Each voxel's Euclidean distance to the nearest voxel of the other class, normalised, signed, boundary 0."""
    coords = np.stack(np.meshgrid(*(np.arange(s) for s in mask.shape), indexing="ij"), -1).reshape(-1, mask.ndim)
    flat = mask.reshape(-1)
    dist = np.sqrt(((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1))
    to_fg = np.where(flat[None, :], dist, np.inf).min(1)
    to_bg = np.where(~flat[None, :], dist, np.inf).min(1)
    outside = np.where(flat, 0.0, to_fg)  # background voxels: distance to the object
    inside = np.where(flat, to_bg, 0.0)  # object voxels: distance to the background
    sdf = outside / outside.max() - inside / inside.max()
    sdf = sdf.reshape(mask.shape)
    sdf[_brute_boundary(mask)] = 0.0
    return sdf


def test_line_example_matches_hand_values():
    mask = np.array([0, 0, 1, 1, 1, 0, 0], dtype=np.uint8).reshape(1, 1, 1, 7)
    # outside distances 2, 1 | inside 1, 2, 1 (max 2 each); both ends of the object are boundary voxels
    expected = np.array([1.0, 0.5, 0.0, -1.0, 0.0, 0.5, 1.0], dtype=np.float32).reshape(1, 1, 1, 7)
    np.testing.assert_allclose(compute_sdf(mask), expected, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_masks_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((2, 4, 5, 6)) < 0.4
    mask[1, 1:4, 1:4, 1:5] = True  # a solid block so some voxels are strictly inside
    sdf = compute_sdf(mask)
    assert sdf.dtype == np.float32 and sdf.shape == mask.shape
    for b in range(mask.shape[0]):
        np.testing.assert_allclose(sdf[b], _brute_sdf(mask[b]), atol=1e-6)


def test_sign_range_and_zero_on_the_inner_boundary():
    mask = np.zeros((1, 9, 9, 9), dtype=bool)
    mask[0, 2:7, 2:7, 2:7] = True
    sdf = compute_sdf(mask)[0]
    boundary = _brute_boundary(mask[0])
    assert np.array_equal(inner_boundary(mask[0]), boundary)
    assert np.all(sdf[boundary] == 0.0)
    assert np.all(sdf[mask[0] & ~boundary] < 0)
    assert np.all(sdf[~mask[0]] > 0)
    assert sdf.min() == pytest.approx(-1.0) and sdf.max() == pytest.approx(1.0)


def test_array_edge_is_not_a_boundary():
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[:2] = True  # touches three faces of the array
    boundary = inner_boundary(mask)
    assert boundary[1].all() and not boundary[0].any()


def test_empty_mask_gives_zeros_and_full_mask_gives_minus_one():
    mask = np.zeros((2, 3, 4, 5), dtype=np.uint8)
    mask[1] = 1
    sdf = compute_sdf(mask)
    assert np.all(sdf[0] == 0.0)
    assert np.all(sdf[1] == -1.0)


def test_any_nonzero_label_counts_as_foreground():
    mask = np.zeros((1, 3, 3, 5), dtype=np.int64)
    mask[0, 1, 1, 1:4] = 2
    np.testing.assert_array_equal(compute_sdf(mask), compute_sdf(mask > 0))


def test_torch_wrapper_returns_float32_on_the_label_device():
    label = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    label[0, 1:3, 1:3, 1:3] = 1
    sdf = compute_sdf_torch(label)
    assert sdf.dtype == torch.float32 and sdf.device == label.device
    np.testing.assert_array_equal(sdf.numpy(), compute_sdf(label.numpy()))


def test_bad_shapes_raise_value_error():
    with pytest.raises(ValueError, match="batch first"):
        compute_sdf(np.zeros(5))
    with pytest.raises(ValueError, match="out_shape"):
        compute_sdf(np.zeros((1, 2, 2, 2)), out_shape=(1, 2, 2, 3))
