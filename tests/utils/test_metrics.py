"""Tests for utils/metrics.py: hand-computed values, brute force, and medpy as the reference library."""

from __future__ import annotations

import math
import sys
from math import comb

import numpy as np
import pytest
from scipy import ndimage

from utils.metrics import METRIC_NAMES, asd, assd, case_metrics, dice, hd95, jaccard, summarise


@pytest.fixture(scope="module")
def medpy_binary():
    """medpy is the reference library; only the tests that compare against it skip without it."""
    return pytest.importorskip("medpy.metric.binary")


def random_blobs(shape: tuple[int, ...], seed: int, fraction: float) -> np.ndarray:
    """Irregular blobs: smoothed noise above its (1 - fraction) quantile; often touches the array border."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.0)
    return field > np.quantile(field, 1.0 - fraction)


def perturbed(mask: np.ndarray, seed: int) -> np.ndarray:
    """A prediction-like copy of ``mask``: dilated or eroded, with some voxels flipped at random."""
    rng = np.random.default_rng(seed)
    out = ndimage.binary_dilation(mask) if seed % 2 else ndimage.binary_erosion(mask)
    flip = rng.random(mask.shape) < 0.01
    return out ^ flip


def brute_force_directed(source: np.ndarray, target: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Directed surface distances by erosion and an all-pairs distance matrix (no EDT, no k-d tree)."""
    structure = ndimage.generate_binary_structure(source.ndim, 1)
    source_surface = np.argwhere(source & ~ndimage.binary_erosion(source, structure, border_value=0))
    target_surface = np.argwhere(target & ~ndimage.binary_erosion(target, structure, border_value=0))
    diff = (source_surface[:, None, :] - target_surface[None, :, :]) * np.asarray(spacing)
    return np.sqrt((diff**2).sum(-1)).min(axis=1)


# --- Dice and Jaccard by hand -------------------------------------------------------------------------------------


def test_dice_and_jaccard_of_tiny_1d_arrays_match_hand_counts():
    pred = np.array([1, 1, 0, 0])
    gt = np.array([0, 1, 1, 0])
    # |A n B| = 1, |A| + |B| = 4, |A u B| = 3
    assert dice(pred, gt) == pytest.approx(0.5)
    assert jaccard(pred, gt) == pytest.approx(1 / 3)


def test_dice_and_jaccard_of_2d_squares_match_hand_counts():
    pred = np.zeros((5, 5), bool)
    gt = np.zeros((5, 5), bool)
    pred[0:2, 0:3] = True  # 6 voxels
    gt[1:3, 0:2] = True  # 4 voxels, overlap row 1 cols 0-1 = 2 voxels
    assert dice(pred, gt) == pytest.approx(2 * 2 / (6 + 4))
    assert jaccard(pred, gt) == pytest.approx(2 / 8)


def test_dice_is_symmetric_and_accepts_integer_labels(medpy_binary):
    gt = random_blobs((12, 13, 14), seed=3, fraction=0.2).astype(np.uint8)
    pred = perturbed(gt.astype(bool), seed=4).astype(np.int64) * 7  # nonzero = foreground
    assert dice(pred, gt) == pytest.approx(dice(gt, pred))
    assert dice(pred, gt) == pytest.approx(medpy_binary.dc(pred, gt))
    assert jaccard(pred, gt) == pytest.approx(medpy_binary.jc(pred, gt))


# --- surface distances by hand ------------------------------------------------------------------------------------


def test_single_voxels_with_anisotropic_spacing_give_the_scaled_euclidean_distance():
    pred = np.zeros((4, 4, 4), bool)
    gt = np.zeros((4, 4, 4), bool)
    pred[1, 1, 1] = True
    gt[2, 2, 2] = True
    expected = math.sqrt(1.0**2 + 1.5**2 + 3.0**2)  # = 3.5
    assert hd95(pred, gt, spacing=(1, 1.5, 3)) == pytest.approx(expected)
    assert asd(pred, gt, spacing=(1, 1.5, 3)) == pytest.approx(expected)
    assert assd(pred, gt, spacing=(1, 1.5, 3)) == pytest.approx(expected)


def cube_shift_distances(n: int) -> np.ndarray:
    """Hand count of the directed surface distances from cube [0, n)^3 to the same cube shifted by (1, 1, 1).

    A surface voxel of A with k coordinates equal to 0 lies outside B and is sqrt(k) from B's nearest (surface)
    voxel. A surface voxel with all coordinates in [1, n - 1] is inside B: distance 0 when one coordinate is 1
    (B's lower faces), else 1 (its coordinate n - 1 has B's upper face at n next to it).
    """
    values = []
    for k in (1, 2, 3):
        values += [math.sqrt(k)] * (comb(3, k) * (n - 1) ** (3 - k))
    inside_on_surface = (n - 1) ** 3 - (n - 2) ** 3
    distance_one = (n - 2) ** 3 - (n - 3) ** 3
    values += [1.0] * distance_one + [0.0] * (inside_on_surface - distance_one)
    return np.asarray(values)


def test_cube_shifted_one_voxel_on_each_axis_matches_the_hand_count():
    n = 6
    pred = np.zeros((12, 12, 12), bool)
    gt = np.zeros((12, 12, 12), bool)
    pred[2 : 2 + n, 2 : 2 + n, 2 : 2 + n] = True
    gt[3 : 3 + n, 3 : 3 + n, 3 : 3 + n] = True
    one_way = cube_shift_distances(n)
    assert one_way.size == n**3 - (n - 2) ** 3  # every surface voxel counted once
    pooled = np.hstack((one_way, one_way))  # the shift is symmetric under reflection
    assert hd95(pred, gt) == pytest.approx(np.percentile(pooled, 95))
    assert asd(pred, gt) == pytest.approx(one_way.mean())
    assert assd(pred, gt) == pytest.approx(pooled.mean())


def test_spheres_shifted_one_voxel_on_each_axis_stay_within_sqrt3():
    grid = np.indices((24, 24, 24))
    pred = ((grid - 11) ** 2).sum(0) <= 36
    gt = ((grid - 12) ** 2).sum(0) <= 36
    value = hd95(pred, gt)
    # every surface voxel is at most the shift, sqrt(3), from the other surface, and most are not on it
    assert 1.0 <= value <= math.sqrt(3) + 1e-12
    pooled = np.hstack((brute_force_directed(pred, gt, (1, 1, 1)), brute_force_directed(gt, pred, (1, 1, 1))))
    assert pooled.max() == pytest.approx(math.sqrt(3))
    assert value == pytest.approx(np.percentile(pooled, 95))


def test_far_false_positive_voxel_enters_asd_but_not_hd95(medpy_binary):
    gt = np.zeros((30, 10, 10), bool)
    gt[2:6, 2:6, 2:6] = True  # 4^3 cube: 56 surface voxels
    pred = gt.copy()
    pred[25, 3, 3] = True  # 20 voxels beyond the face x = 5
    assert asd(pred, gt) == pytest.approx(20 / 57)
    assert assd(pred, gt) == pytest.approx(20 / 113)
    assert hd95(pred, gt) == pytest.approx(0.0)  # 1 of 113 pooled distances is not above the 95th percentile
    assert hd95(pred, gt) == pytest.approx(medpy_binary.hd95(pred, gt), abs=1e-6)


def test_directed_asd_uses_prediction_surface_first(medpy_binary):
    gt = np.zeros((20, 20), bool)
    gt[5:15, 5:15] = True
    pred = np.zeros((20, 20), bool)
    pred[9:11, 9:11] = True  # deep inside gt: 2 to 5 voxels from its border
    assert asd(pred, gt) == pytest.approx(medpy_binary.asd(pred, gt))
    assert asd(gt, pred) == pytest.approx(medpy_binary.asd(gt, pred))
    assert asd(pred, gt) != pytest.approx(asd(gt, pred))


# --- agreement with medpy -----------------------------------------------------------------------------------------

CASES = [
    ((20, 24, 18), None, 0.15),
    ((20, 24, 18), (1.0, 1.5, 3.0), 0.15),
    ((17, 31, 9), 0.7, 0.3),
    ((30, 30, 30), (2.0, 1.0, 1.0), 0.05),
    ((40, 33), None, 0.2),
    ((40, 33), (1.5, 0.5), 0.4),
    ((64,), None, 0.3),
]


@pytest.mark.parametrize("shape, spacing, fraction", CASES)
def test_surface_metrics_equal_medpy_on_random_blobs(shape, spacing, fraction, medpy_binary):
    for seed in range(4):
        gt = random_blobs(shape, seed=seed, fraction=fraction)
        pred = perturbed(gt, seed=seed + 100)
        assert gt.any() and pred.any()
        ours = case_metrics(pred, gt, spacing=spacing)
        assert ours["hd95"] == pytest.approx(medpy_binary.hd95(pred, gt, voxelspacing=spacing), abs=1e-6)
        assert ours["asd"] == pytest.approx(medpy_binary.asd(pred, gt, voxelspacing=spacing), abs=1e-6)
        assert ours["assd"] == pytest.approx(medpy_binary.assd(pred, gt, voxelspacing=spacing), abs=1e-6)
        assert hd95(pred, gt, spacing) == ours["hd95"]
        assert asd(pred, gt, spacing) == ours["asd"]
        assert assd(pred, gt, spacing) == ours["assd"]


def test_far_false_positives_with_anisotropic_spacing_equal_medpy(medpy_binary):
    gt = np.zeros((60, 50, 40), bool)
    gt[10:25, 12:30, 8:20] = random_blobs((15, 18, 12), seed=7, fraction=0.6)
    pred = ndimage.binary_dilation(gt)
    pred[58, 48, 38] = pred[0, 49, 0] = True  # far away, on the array border
    spacing = (1.0, 1.5, 3.0)
    assert hd95(pred, gt, spacing) == pytest.approx(medpy_binary.hd95(pred, gt, voxelspacing=spacing), abs=1e-6)
    assert asd(pred, gt, spacing) == pytest.approx(medpy_binary.asd(pred, gt, voxelspacing=spacing), abs=1e-6)
    assert asd(gt, pred, spacing) == pytest.approx(medpy_binary.asd(gt, pred, voxelspacing=spacing), abs=1e-6)


@pytest.mark.parametrize("spacing", [None, (0.5, 2.0, 1.25)])
def test_scattered_voxels_far_from_the_other_surface_equal_medpy(spacing, medpy_binary):
    # distances well beyond the direct neighbourhood search, and many exact ties
    rng = np.random.default_rng(21)
    pred = rng.random((25, 20, 15)) < 0.004
    gt = rng.random((25, 20, 15)) < 0.01
    assert hd95(pred, gt, spacing) == pytest.approx(medpy_binary.hd95(pred, gt, voxelspacing=spacing), abs=1e-6)
    assert asd(pred, gt, spacing) == pytest.approx(medpy_binary.asd(pred, gt, voxelspacing=spacing), abs=1e-6)
    assert assd(pred, gt, spacing) == pytest.approx(medpy_binary.assd(pred, gt, voxelspacing=spacing), abs=1e-6)


def test_masks_touching_the_array_border_have_surface_there_as_in_medpy(medpy_binary):
    full = np.ones((6, 7, 8), bool)  # the surface is the outer shell only
    half = np.zeros((6, 7, 8), bool)
    half[:, :, :4] = True
    assert hd95(half, full) == pytest.approx(medpy_binary.hd95(half, full), abs=1e-6)
    assert asd(half, full) == pytest.approx(medpy_binary.asd(half, full), abs=1e-6)
    assert asd(full, half) == pytest.approx(medpy_binary.asd(full, half), abs=1e-6)
    # hand check: the shell of `full` is its own surface, so identical full masks are 0 apart
    assert hd95(full, full) == 0.0


def test_brute_force_agrees_on_a_random_3d_case():
    gt = random_blobs((14, 12, 10), seed=11, fraction=0.25)
    pred = perturbed(gt, seed=12)
    spacing = (1.0, 1.5, 3.0)
    forward = brute_force_directed(pred, gt, spacing)
    backward = brute_force_directed(gt, pred, spacing)
    assert asd(pred, gt, spacing) == pytest.approx(forward.mean())
    assert hd95(pred, gt, spacing) == pytest.approx(np.percentile(np.hstack((forward, backward)), 95))


def test_medpy_backend_gives_the_same_row(medpy_binary):
    gt = random_blobs((16, 18, 14), seed=5, fraction=0.2)
    pred = perturbed(gt, seed=6)
    fast = case_metrics(pred, gt, spacing=(1, 1.5, 3))
    reference = case_metrics(pred, gt, spacing=(1, 1.5, 3), metric_backend="medpy")
    assert fast.keys() == reference.keys()
    for name in METRIC_NAMES:
        assert fast[name] == pytest.approx(reference[name], abs=1e-6)


# --- empty masks --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["fast", "medpy"])
@pytest.mark.parametrize(
    "pred_empty, gt_empty, expected_overlap", [(True, True, 1.0), (True, False, 0.0), (False, True, 0.0)]
)
def test_empty_masks_never_crash_and_give_the_documented_values(backend, pred_empty, gt_empty, expected_overlap):
    blob = np.zeros((8, 9, 10), bool)
    blob[2:5, 3:6, 4:7] = True
    pred = np.zeros_like(blob) if pred_empty else blob
    gt = np.zeros_like(blob) if gt_empty else blob
    row = case_metrics(pred, gt, spacing=(1, 1, 2), metric_backend=backend)
    assert row["dice"] == expected_overlap and row["jaccard"] == expected_overlap
    assert math.isnan(row["hd95"]) and math.isnan(row["asd"]) and math.isnan(row["assd"])
    assert row["empty_pred"] is pred_empty and row["empty_gt"] is gt_empty
    # never a perfect HD95 from the stand-alone functions either
    assert math.isnan(hd95(pred, gt)) and math.isnan(asd(pred, gt)) and math.isnan(assd(pred, gt))


def metric_row(dice_value, hd95_value, asd_value, empty_pred=False):
    """A case row shaped like case_metrics' output (jaccard and assd derived just to fill the keys)."""
    return {
        "case": "x",
        "dice": dice_value,
        "jaccard": dice_value / 2,
        "hd95": hd95_value,
        "asd": asd_value,
        "assd": asd_value,
        "empty_pred": empty_pred,
        "empty_gt": False,
    }


def test_summarise_excludes_nans_from_the_mean_and_counts_them():
    rows = [metric_row(0.8, 2.0, 1.0), metric_row(0.6, 4.0, 3.0), metric_row(0.0, math.nan, math.nan, True)]
    summary = summarise(rows)
    assert summary["n_cases"] == 3
    assert summary["n_empty_pred"] == 1 and summary["n_empty_gt"] == 0
    assert summary["dice_mean"] == pytest.approx(1.4 / 3) and summary["n_nan_dice"] == 0
    assert summary["hd95_mean"] == pytest.approx(3.0) and summary["hd95_std"] == pytest.approx(1.0)
    assert summary["n_nan_hd95"] == 1 and summary["n_nan_asd"] == 1 and summary["n_nan_assd"] == 1


def test_summarise_of_all_nan_metric_is_nan_with_full_count():
    summary = summarise([{"hd95": math.nan}, {"hd95": math.nan}])
    assert math.isnan(summary["hd95_mean"]) and summary["n_nan_hd95"] == 2


# --- error paths --------------------------------------------------------------------------------------------------


def test_shape_mismatch_raises_value_error():
    with pytest.raises(ValueError, match="must match"):
        dice(np.zeros((3, 4)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="must match"):
        hd95(np.ones((3, 4)), np.ones((3, 5)))


@pytest.mark.parametrize("spacing", [(1.0, 2.0), (1.0, 0.0, 1.0), (1.0, -1.0, 1.0), (1.0, math.inf, 1.0)])
def test_bad_spacing_raises_value_error(spacing):
    mask = np.ones((3, 3, 3), bool)
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(mask, mask, spacing=spacing)


def test_unknown_backend_and_empty_summary_raise_value_error():
    mask = np.ones((3, 3, 3), bool)
    with pytest.raises(ValueError, match="metric_backend"):
        case_metrics(mask, mask, metric_backend="monai")
    with pytest.raises(ValueError, match="at least one"):
        summarise([])
    with pytest.raises(ValueError, match="missing"):
        summarise([{"dice": 1.0}, {"jaccard": 1.0}])


def test_medpy_backend_without_medpy_raises_a_clear_import_error(monkeypatch):
    for name in ("medpy", "medpy.metric", "medpy.metric.binary"):
        monkeypatch.setitem(sys.modules, name, None)
    mask = np.ones((3, 3, 3), bool)
    with pytest.raises(ImportError, match="pip install medpy"):
        case_metrics(mask, mask, metric_backend="medpy")
