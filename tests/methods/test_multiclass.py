"""Every method with C = 3 classes (issue #18): UG-MCL's and DTC's terms against references written in plain numpy
on tiny (B=2, C=3, 2, 2, 2) tensors, the ln 3 threshold, per-class ground-truth SDFs, and one training step of
every method in ``methods.METHODS`` on a tiny network. C = 2 is covered by the golden tests (``test_ugmcl.py``)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from engine.config import TrainConfig
from methods import METHODS
from methods.base import Batch
from methods.dtc import dtc_objective
from methods.entropy_min import entropy_min_objective
from methods.supervised import supervised_objective
from methods.uamt import uamt_objective
from methods.ugmcl import ground_truth_sdf, ugmcl_objective
from networks.net_factory_3d import NETWORKS_3D, net_factory_3d
from networks.unet_3D import unet_3D_ds, unet_3D_dt
from networks.vnet import VNet_dt
from utils.sdf import compute_sdf_torch

C = 3
LN2, LN3 = math.log(2.0), math.log(3.0)
# per-voxel logits patterns: softmax (1/2, 1/4, 1/4), (1/4, 1/2, 1/4), (1/4, 1/4, 1/2), (1/3, 1/3, 1/3)
_A, _B, _C, _D = (LN2, 0.0, 0.0), (0.0, LN2, 0.0), (0.0, 0.0, LN2), (0.0, 0.0, 0.0)
STUDENT = [[_A, _B, _C, _D, _A, _B, _C, _D], [_B, _C, _A, _D, _D, _A, _B, _C]]
TEACHER = [[_A, _A, _C, _C, _D, _B, _B, _D], [_D, _C, _A, _A, _B, _B, _C, _D]]
LABEL = [[0, 1, 2, 0, 1, 1, 2, 2], [2, 2, 2, 2, 2, 2, 2, 2]]  # row 1 is unlabelled: never read
UNCERTAINTY = [[0.5, 0.9, 1.2, 0.5, 0.9, 1.2, 0.5, 0.9], [1.2, 0.9, 0.5, 0.5, 1.2, 0.9, 0.5, 1.2]]
LB = 1
RAMPUP = 100  # the threshold ramp's length; at step RAMPUP tau = 1.0 * ln C exactly
K = 1500.0


def _logits(rows: list[list[tuple[float, float, float]]]) -> torch.Tensor:
    """(B, 3, 2, 2, 2) from B rows of 8 per-voxel (z0, z1, z2)."""
    return torch.tensor(rows, dtype=torch.float32).permute(0, 2, 1).reshape(len(rows), C, 2, 2, 2)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# ----------------------------------------------------------------------------------------------
# references in plain numpy (float64), independent of the code under test
# ----------------------------------------------------------------------------------------------
def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for x = -1500 d


def _ce(z: np.ndarray, y: np.ndarray) -> float:
    log_p = np.log(_softmax(z))
    return float(-np.mean(np.take_along_axis(log_p, y[:, None], axis=1)))


def _dice(s: np.ndarray, t: np.ndarray) -> float:
    t = t.astype(np.float64)
    return float(1.0 - (2.0 * np.sum(s * t) + 1e-5) / (np.sum(s * s) + np.sum(t * t) + 1e-5))


def _fg_dice(s: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([_dice(s[:, c], y == c) for c in range(1, s.shape[1])]))


def _weight(step: int) -> float:
    return 0.1 * math.exp(-5.0 * (1.0 - min(step // 150, 200) / 200.0) ** 2)


@pytest.fixture()
def case():
    z, q = _logits(STUDENT), _logits(TEACHER)
    label = torch.tensor(LABEL).reshape(2, 2, 2, 2)
    uncertainty = torch.tensor(UNCERTAINTY).reshape(2, 1, 2, 2, 2)
    return z, q, label, uncertainty


def _released(case, step=RAMPUP, **kwargs):
    z, q, label, uncertainty = case
    return ugmcl_objective(torch.tanh(z), z, q, uncertainty, label, LB, step, threshold_rampup=RAMPUP, **kwargs)


# ----------------------------------------------------------------------------------------------
# UG-MCL
# ----------------------------------------------------------------------------------------------
def test_ugmcl_threshold_is_ln_3_and_keeps_voxels_above_ln_2(case):
    terms = _released(case)
    assert terms["threshold"] == pytest.approx(LN3, rel=1e-12)
    assert _released(case, step=0)["threshold"] == pytest.approx((0.75 + 0.25 * math.exp(-5.0)) * LN3, rel=1e-12)
    # U = 1.2 > ln 3 is dropped; U = 0.9 (above ln 2, below ln 3) and U = 0.5 are kept: 6 + 5 of 16 voxels
    expected = (torch.tensor(UNCERTAINTY) < 1.0).float().reshape(2, 1, 2, 2, 2)
    torch.testing.assert_close(terms["mask"], expected)
    assert terms["mask"].sum().item() == 11


def test_ugmcl_cross_entropy_of_three_classes_matches_the_hand_value(case):
    # labelled row: p_y = 1/2 at 5 voxels, 1/3 at 2, 1/4 at 1
    assert _released(case)["loss_seg"].item() == pytest.approx((7 * LN2 + 2 * LN3) / 8, rel=1e-6)


def test_ugmcl_every_term_at_three_classes_matches_the_numpy_reference(case):
    terms = _released(case)
    z, q, label, uncertainty = (_np(t) for t in case)
    y = label[:LB].astype(np.int64)
    p, pt = _softmax(z), _softmax(q)
    m = _sigmoid(-K * np.tanh(z))
    keep = (uncertainty < LN3).astype(np.float64)
    w = _weight(RAMPUP)
    expected = {
        "loss_seg": _ce(z[:LB], y),
        "loss_seg_dice": _fg_dice(p[:LB], y),  # mean over classes 1 and 2
        "loss_dis_dice": _fg_dice(m[:LB], y),
        "consistency_dist": 0.5 * np.sum(keep * (p - pt) ** 2) / (C * np.sum(keep) + 1e-16),
        "cross_task_dist": np.mean((m - p) ** 2),  # all three channels, whole batch
    }
    expected["supervised_loss"] = 0.5 * (expected["loss_seg"] + expected["loss_seg_dice"] + expected["loss_dis_dice"])
    expected["consistency_loss"] = w * expected["consistency_dist"]
    expected["cross_task_loss"] = w * expected["cross_task_dist"]
    expected["loss"] = expected["supervised_loss"] + expected["consistency_loss"] + expected["cross_task_loss"]
    assert terms["consistency_weight"] == pytest.approx(w, rel=1e-12)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(float(value), rel=1e-5, abs=1e-7), name
    assert 0 < expected["loss_dis_dice"] < 1 and expected["consistency_dist"] > 0  # the terms are not trivial


def test_ugmcl_three_class_run_reads_only_the_labelled_rows(case):
    z, q, label, uncertainty = case
    other = label.clone()
    other[LB:] = 0
    a = _released(case)
    b = ugmcl_objective(torch.tanh(z), z, q, uncertainty, other, LB, RAMPUP, threshold_rampup=RAMPUP)
    assert torch.equal(a["loss"], b["loss"])


def test_ground_truth_sdf_is_per_class_with_c_channels_and_of_the_foreground_with_one():
    label = torch.tensor([0, 1, 1, 2, 2]).reshape(1, 1, 1, 5)
    # DTC convention on a 1-D row: outside / inside EDT each normalised, 0 on the inner boundary
    per_class = torch.tensor(
        [
            [0.0, 0.25, 0.5, 0.75, 1.0],  # label == 0
            [0.5, 0.0, 0.0, 0.5, 1.0],  # label == 1
            [1.0, 2 / 3, 1 / 3, 0.0, -1.0],  # label == 2 (the array edge is not a surface)
        ]
    ).reshape(1, 3, 1, 1, 5)
    foreground = torch.tensor([1.0, 0.0, -0.5, -0.75, -1.0]).reshape(1, 1, 1, 1, 5)  # label > 0
    torch.testing.assert_close(ground_truth_sdf(label, 3), per_class)
    torch.testing.assert_close(ground_truth_sdf(label, 1), foreground)
    with pytest.raises(ValueError, match="1 or C >= 2 channels"):
        ground_truth_sdf(label, 0)


def _paper(case, channels: int, beta: float = 0.75):
    z, q, label, uncertainty = case
    gen = torch.Generator().manual_seed(0)
    dis = torch.tanh(0.002 * torch.randn(2, channels, 2, 2, 2, generator=gen))
    teacher_dis = torch.tanh(0.002 * torch.randn(2, channels, 2, 2, 2, generator=gen))
    terms = ugmcl_objective(dis, z, q, uncertainty, label, LB, RAMPUP, threshold_rampup=RAMPUP, variant="paper",
                            beta=beta, teacher_dis=teacher_dis)
    return terms, dis, teacher_dis


def test_ugmcl_paper_variant_with_a_three_channel_head_regresses_each_class_sdf(case):
    terms, dis, teacher_dis = _paper(case, channels=3)
    z, q, label, uncertainty = case
    gt = torch.stack([compute_sdf_torch(label[:LB] == c) for c in range(C)], dim=1)
    d, dt, y = _np(dis), _np(teacher_dis), _np(label[:LB]).astype(np.int64)
    keep = (_np(uncertainty) < LN3).astype(np.float64)
    p, pt, m = _softmax(_np(z)), _softmax(_np(q)), _sigmoid(-K * d)
    seg = np.sum(keep * (p - pt) ** 2) / (C * keep.sum())
    sdf = np.sum(keep * (d - dt) ** 2) / (C * keep.sum())
    assert terms["loss_sdf"].item() == pytest.approx(float(np.mean((d[:LB] - _np(gt)) ** 2)), rel=1e-5)
    assert terms["loss_dis_dice"].item() == pytest.approx(_fg_dice(m[:LB], y), rel=1e-5)
    assert terms["consistency_dist"].item() == pytest.approx(0.5 * (0.75 * seg + 0.25 * sdf), rel=1e-5)
    assert terms["cross_task_dist"].item() == pytest.approx(float(np.mean((m - p) ** 2)), rel=1e-5)


def test_ugmcl_paper_variant_with_a_one_channel_head_uses_the_whole_foreground(case):
    terms, dis, _ = _paper(case, channels=1)
    z, _, label, _ = case
    gt = compute_sdf_torch(label[:LB] > 0).unsqueeze(1)
    d, y = _np(dis), _np(label[:LB]).astype(np.int64)
    m, p = _sigmoid(-K * d), _softmax(_np(z))
    foreground = p[:, 1:].sum(axis=1, keepdims=True)  # 1 - p_0
    assert terms["loss_sdf"].item() == pytest.approx(float(np.mean((d[:LB] - _np(gt)) ** 2)), rel=1e-5)
    assert terms["loss_dis_dice"].item() == pytest.approx(_dice(m[:LB, 0], y > 0), rel=1e-5)
    assert terms["cross_task_dist"].item() == pytest.approx(float(np.mean((m - foreground) ** 2)), rel=1e-5)


def test_ugmcl_refuses_a_distance_output_with_another_number_of_channels(case):
    z, q, label, uncertainty = case
    with pytest.raises(ValueError, match=r"student_dis .* C in \(3,\)"):
        ugmcl_objective(torch.tanh(z[:, :2]), z, q, uncertainty, label, LB, 0, threshold_rampup=RAMPUP)
    with pytest.raises(ValueError, match=r"C in \(1, 3\)"):
        ugmcl_objective(torch.tanh(z[:, :2]), z, q, uncertainty, label, LB, 0, threshold_rampup=RAMPUP,
                        variant="paper", teacher_dis=torch.tanh(z[:, :2]))


# ----------------------------------------------------------------------------------------------
# DTC and the baselines
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [3, 1])
def test_dtc_terms_at_three_classes_match_the_numpy_reference(case, channels):
    z, _, label, _ = case
    gen = torch.Generator().manual_seed(1)
    dis = torch.tanh(0.002 * torch.randn(2, channels, 2, 2, 2, generator=gen))
    terms = dtc_objective(dis, z, label, LB, 3000)
    gt = ground_truth_sdf(label[:LB], channels)
    assert gt.shape == (LB, channels, 2, 2, 2)
    d, y, p = _np(dis), _np(label[:LB]).astype(np.int64), _softmax(_np(z))
    target = p if channels == C else p[:, 1:].sum(axis=1, keepdims=True)
    sup = 0.5 * (_ce(_np(z[:LB]), y) + _fg_dice(p[:LB], y)) + 0.3 * np.mean((d[:LB] - _np(gt)) ** 2)
    dtc = np.mean((_sigmoid(-K * d) - target) ** 2)
    assert all(terms[k].shape == () for k in ("loss", "supervised_loss", "loss_dice", "loss_sdf", "consistency_dist"))
    assert terms["loss_dice"].item() == pytest.approx(_fg_dice(p[:LB], y), rel=1e-5)
    assert terms["supervised_loss"].item() == pytest.approx(float(sup), rel=1e-5)
    assert terms["consistency_dist"].item() == pytest.approx(float(dtc), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(float(sup + _weight(3000) * dtc), rel=1e-5)


def test_dtc_refuses_a_two_channel_sdf_for_three_classes(case):
    z, _, label, _ = case
    with pytest.raises(ValueError, match=r"dis .* must be \(B, 1 or 3"):
        dtc_objective(torch.zeros(2, 2, 2, 2, 2), z, label, LB, 0)


def test_foreground_dice_mode_averages_classes_one_and_two(case):
    z, _, label, _ = case
    y, p = _np(label[:LB]).astype(np.int64), _softmax(_np(z[:LB]))
    terms = supervised_objective(z, label, LB, dice="foreground")
    assert terms["loss_dice"].item() == pytest.approx(_fg_dice(p, y), rel=1e-6)
    every_class = np.mean([_dice(p[:, c], y == c) for c in range(C)])
    assert supervised_objective(z, label, LB)["loss_dice"].item() == pytest.approx(float(every_class), rel=1e-6)


def test_uamt_at_three_classes_thresholds_at_ln_3_and_averages_over_the_kept_voxel_class_pairs(case):
    z, q, label, uncertainty = case
    terms = uamt_objective(z, q[LB:], uncertainty[LB:], label, LB, RAMPUP, threshold_rampup=RAMPUP)
    keep = (_np(uncertainty[LB:]) < LN3).astype(np.float64)
    dist = np.sum(keep * (_softmax(_np(z[LB:])) - _softmax(_np(q[LB:]))) ** 2) / (C * keep.sum())
    assert terms["threshold"] == pytest.approx(LN3, rel=1e-12)
    assert terms["consistency_dist"].item() == pytest.approx(float(dist), rel=1e-5)


def test_entropy_minimisation_at_three_classes_divides_by_ln_3(case):
    z, _, label, _ = case
    p = _softmax(_np(z))
    entropy = np.mean(-np.sum(p * np.log(p + 1e-6), axis=1)) / LN3
    assert entropy_min_objective(z, label, LB, 0)["entropy"].item() == pytest.approx(float(entropy), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# one training step of every method on a tiny three-class network
# ----------------------------------------------------------------------------------------------
def _network(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "unet_3D_dt":
        return unet_3D_dt(feature_scale=16, n_classes=C)
    if name == "unet_3D_ds":
        return unet_3D_ds(feature_scale=16, n_classes=C)
    if name == "vnet_dt":
        return VNet_dt(n_classes=C, n_filters=4, has_dropout=True)
    if name in NETWORKS_3D:  # any other network the factory knows, as small as it goes
        kwargs = {"feature_scale": 16} if name.startswith("unet") else {"n_filters": 4}
        return net_factory_3d(name, in_chns=1, class_num=C, **kwargs)
    raise AssertionError(f"no tiny network for {name}")


def _batch(labeled_bs: int) -> Batch:
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1, 32, 32, 32, generator=gen)
    label = torch.zeros(2, 32, 32, 32, dtype=torch.long)
    label[:, 4:14, 6:16, 8:18] = 1
    label[:, 16:28, 14:26, 12:24] = 2
    return Batch(image, label, labeled_bs)


STEP_CASES = [(name, "released") for name in METHODS] + [("ugmcl", "paper")]


@pytest.mark.parametrize("method_name, variant", STEP_CASES)
def test_every_method_trains_a_step_with_three_classes(method_name, variant):
    method_cls = METHODS[method_name]
    cfg = replace(TrainConfig(), num_classes=C, variant=variant, mc_passes=2, mc_chunk=0, max_iterations=100,
                  consistency_interval=1, consistency_rampup=0)
    student = _network(method_cls.model_for(cfg))
    method = method_cls(student, cfg)
    batch = _batch(labeled_bs=1 if method_cls.uses_unlabeled else 2)
    loss, logs = method.training_step(batch, step=1)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(math.isfinite(v) for v in logs.values())
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
