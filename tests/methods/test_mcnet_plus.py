"""MC-Net+ (issue #20): sharpening, the pairwise mutual consistency and the whole objective against values worked out
by hand on one-voxel tensors, and a training step of ``mcnet3d_v2`` at C = 2 and C = 3."""

from __future__ import annotations

import importlib
import math
from dataclasses import replace

import pytest
import torch

from engine.config import TrainConfig
from methods import METHODS
from methods.base import Batch
from methods.mcnet_plus import PUBLISHED_RAMP, MCNetPlus, mcnet_plus_objective, mutual_consistency, sharpen
from networks.mcnet import MCNet3d_v2
from networks.unet_3D import unet_3D
from networks.vnet import VNet_dt
from utils.ramps import ConsistencyRamp

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LN3 = math.log(3.0)


def _probs(*per_voxel: tuple[float, ...]) -> torch.Tensor:
    """(B, C, 1, 1, 1) from one class vector per row."""
    return torch.tensor(per_voxel, dtype=torch.float64).reshape(len(per_voxel), -1, 1, 1, 1)


def _logits(*foreground: float) -> torch.Tensor:
    """(B, 2, 1, 1, 1) two-class logits (0, a): foreground probability sigmoid(a)."""
    return torch.tensor([[0.0, a] for a in foreground], dtype=torch.float64).reshape(len(foreground), 2, 1, 1, 1)


# ----------------------------------------------------------------------------------------------
# sharpen
# ----------------------------------------------------------------------------------------------
def test_sharpen_raises_to_the_power_one_over_t_and_renormalises_over_the_classes():
    # T = 0.5: (0.6^2, 0.4^2) / 0.52; (0.5^2, 0.25^2, 0.25^2) / 0.375 = (2/3, 1/6, 1/6)
    torch.testing.assert_close(sharpen(_probs((0.6, 0.4)), 0.5), _probs((0.36 / 0.52, 0.16 / 0.52)))
    torch.testing.assert_close(sharpen(_probs((0.5, 0.25, 0.25)), 0.5), _probs((2 / 3, 1 / 6, 1 / 6)))
    # T = 0.1 (released): 0.6^10 = 0.0060466176, 0.4^10 = 0.0001048576
    expected = 0.0060466176 / (0.0060466176 + 0.0001048576)
    torch.testing.assert_close(sharpen(_probs((0.6, 0.4))), _probs((expected, 1 - expected)))


def test_sharpen_is_the_released_binary_formula_for_two_classes_and_the_identity_at_t_1():
    p1 = torch.rand(3, 1, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    prob = torch.cat([1 - p1, p1], dim=1)
    released = prob**10 / (prob**10 + (1 - prob) ** 10)  # ycwu1997/MC-Net sharpening(P), T = 0.1
    torch.testing.assert_close(sharpen(prob, 0.1), released)
    torch.testing.assert_close(sharpen(prob, 1.0), prob)


def test_sharpen_does_not_underflow_to_nan_for_a_small_temperature():
    out = sharpen(_probs((0.5, 0.5), (0.9, 0.1), (1.0, 0.0)).float(), 0.001)  # 0.5^1000 is 0 in float32
    torch.testing.assert_close(out, _probs((0.5, 0.5), (1.0, 0.0), (1.0, 0.0)).float())


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan")])
def test_sharpen_refuses_a_temperature_that_is_not_positive(temperature):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sharpen(_probs((0.5, 0.5)), temperature)


# ----------------------------------------------------------------------------------------------
# mutual consistency
# ----------------------------------------------------------------------------------------------
def test_mutual_consistency_sums_the_squared_gaps_over_the_ordered_pairs():
    p1, p2 = _probs((0.4, 0.6)), _probs((0.2, 0.8))
    s1, s2 = _probs((0.3, 0.7)), _probs((0.1, 0.9))
    # (p1 - s2)^2 = 0.3^2 on both channels, (p2 - s1)^2 = 0.1^2: 0.09 + 0.01
    assert mutual_consistency([p1, p2], [s1, s2]).item() == pytest.approx(0.10, rel=1e-12)
    p3, s3 = _probs((0.5, 0.5)), _probs((0.5, 0.5))
    # + (p1 - s3)^2 = 0.01, (p2 - s3)^2 = 0.09, (p3 - s1)^2 = 0.04, (p3 - s2)^2 = 0.16
    assert mutual_consistency([p1, p2, p3], [s1, s2, s3]).item() == pytest.approx(0.10 + 0.10 + 0.20, rel=1e-12)


def test_mutual_consistency_refuses_one_decoder_or_mismatched_maps():
    p = _probs((0.5, 0.5))
    with pytest.raises(ValueError, match="K >= 2"):
        mutual_consistency([p], [p])
    with pytest.raises(ValueError, match="K >= 2"):
        mutual_consistency([p, p], [p])
    with pytest.raises(ValueError, match="same shape"):
        mutual_consistency([p, _probs((0.5, 0.5), (0.5, 0.5))], [p, p])


# ----------------------------------------------------------------------------------------------
# the objective
# ----------------------------------------------------------------------------------------------
# decoders' foreground probabilities on (labelled row 0, unlabelled row 1): logits (0, a), p = sigmoid(a)
P = [(0.75, 0.25), (0.5, 0.5), (0.9, 0.75)]
A = [tuple(math.log(p / (1 - p)) for p in rows) for rows in P]
S = {0.75: 0.9, 0.5: 0.5, 0.9: 0.81 / 0.82, 0.25: 0.1}  # sharpen at T = 0.5: p^2 / (p^2 + (1 - p)^2)
STEP = 3000  # released ramp: 1 * exp(-5 (1 - (3000 // 150) / 40)^2) = exp(-1.25)


def _dice(p: float, smooth: float = 1e-5) -> float:
    """Foreground Dice loss of one voxel of label 1: 1 - (2 p + s) / (p^2 + 1 + s)."""
    return 1 - (2 * p + smooth) / (p * p + 1 + smooth)


def test_the_objective_is_the_decoders_supervised_sum_plus_the_ramped_mutual_consistency():
    logits = [_logits(*a) for a in A]
    label = torch.tensor([1, 0]).reshape(2, 1, 1, 1)  # row 1 is unlabelled: never read
    terms = mcnet_plus_objective(logits, label, 1, STEP, temperature=0.5)

    ce = sum(-math.log(p[0]) for p in P)
    dice = sum(_dice(p[0]) for p in P)
    # both channels' gaps are equal (p_0 = 1 - p_1), so each pair's mean is the mean over the two rows
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    dist = sum(sum((P[i][r] - S[P[j][r]]) ** 2 for r in (0, 1)) / 2 for i, j in pairs)
    weight = math.exp(-1.25)
    # the objective computes in float32
    assert terms["loss_ce"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["loss_dice"].item() == pytest.approx(dice, rel=1e-6)
    assert terms["supervised_loss"].item() == pytest.approx(0.5 * (ce + dice), rel=1e-6)
    assert terms["consistency_weight"] == pytest.approx(weight, rel=1e-12)
    assert terms["consistency_dist"].item() == pytest.approx(dist, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(0.5 * (ce + dice) + weight * dist, rel=1e-6)


def test_the_consistency_rows_can_be_the_unlabelled_ones_only():
    logits = [_logits(*a) for a in A]
    label = torch.tensor([1, 0]).reshape(2, 1, 1, 1)
    terms = mcnet_plus_objective(logits, label, 1, STEP, rows="unlabeled", temperature=0.5)
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    assert terms["consistency_dist"].item() == pytest.approx(sum((P[i][1] - S[P[j][1]]) ** 2 for i, j in pairs))


def test_the_pseudo_labels_carry_no_gradient():
    # p1 = 0.5 (s1 = 0.5), p2 = 0.75 (s2 = 0.9), T = 0.5: L = (p1 - s2)^2 + (p2 - s1)^2 on channel 1 (and channel 0).
    # With s detached dL/da1 = 2 (p1 - s2) p1 (1 - p1) = -0.2; through s1 too it would add 2 (p2 - s1)(-2)(0.25).
    a1 = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    z1 = a1.reshape(1, 2, 1, 1, 1)
    z2 = _logits(math.log(3.0))
    terms = mcnet_plus_objective([z1, z2], torch.ones(1, 1, 1, 1, dtype=torch.long), 1, 0, temperature=0.5)
    assert terms["consistency_dist"].item() == pytest.approx(0.16 + 0.0625)
    (grad,) = torch.autograd.grad(terms["consistency_dist"], a1)
    torch.testing.assert_close(grad, torch.tensor([[0.2, -0.2]], dtype=torch.float64))


def test_the_objective_defaults_to_the_released_ramp_and_temperature():
    assert PUBLISHED_RAMP == ConsistencyRamp(1.0, 40.0, 150)
    logits = [_logits(*a).float() for a in A]
    label = torch.tensor([1, 0]).reshape(2, 1, 1, 1)
    terms = mcnet_plus_objective(logits, label, 1, 6000)
    assert terms["consistency_weight"] == 1.0
    released = [sharpen(torch.softmax(z, dim=1), 0.1) for z in logits]
    probs = [torch.softmax(z, dim=1) for z in logits]
    torch.testing.assert_close(terms["consistency_dist"], mutual_consistency(probs, released))


def test_the_objective_refuses_ill_shaped_decoders():
    label = torch.ones(2, 1, 1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="K >= 2"):
        mcnet_plus_objective([_logits(0.0, 0.0)], label, 1, 0)
    with pytest.raises(ValueError, match="same shape"):
        mcnet_plus_objective([_logits(0.0, 0.0), _logits(0.0)], label, 1, 0)
    with pytest.raises(ValueError, match="C >= 2"):
        one_class = torch.zeros(2, 1, 1, 1, 1)
        mcnet_plus_objective([one_class, one_class], label, 1, 0)
    with pytest.raises(ValueError, match="labeled_bs"):
        mcnet_plus_objective([_logits(0.0, 0.0)] * 3, label, 3, 0)


# ----------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------
def _config(**overrides) -> TrainConfig:
    cfg = TrainConfig(method="mcnet_plus", max_iterations=100, consistency_interval=1, consistency_rampup=0)
    return replace(cfg, **overrides)


def _batch(classes: int) -> Batch:
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1, 32, 32, 32, generator=gen)
    label = torch.zeros(2, 32, 32, 32, dtype=torch.long)
    label[:, 4:14, 6:16, 8:18] = 1
    if classes > 2:
        label[:, 16:28, 14:26, 12:24] = 2
    return Batch(image, label, 1)


@pytest.mark.parametrize("classes", [2, 3])
def test_a_training_step_gives_a_finite_loss_and_gradients_to_every_decoder(classes):
    torch.manual_seed(0)
    net = MCNet3d_v2(n_classes=classes, n_filters=4, has_dropout=True)
    method = MCNetPlus(net, _config(num_classes=classes))
    loss, logs = method.training_step(_batch(classes), step=1)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(logs) == set(MCNetPlus.logged) and all(math.isfinite(v) for v in logs.values())
    assert logs["consistency_weight"] == 0.1 and logs["consistency_dist"] > 0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    for decoder in (net.decoder1, net.decoder2, net.decoder3):
        assert decoder.out_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("net", [unet_3D(feature_scale=16), VNet_dt(n_filters=4)], ids=["logits", "dis_logits"])
def test_a_network_without_three_decoders_is_refused_naming_mcnet3d_v2(net):
    method = MCNetPlus(net, _config())
    with pytest.raises(ValueError, match="mcnet3d_v2"):
        method.training_step(_batch(2), step=0)


def test_the_method_is_registered_with_its_network_and_released_rows():
    assert METHODS["mcnet_plus"] is MCNetPlus
    assert MCNetPlus.uses_unlabeled and MCNetPlus.model_for(_config()) == "mcnet3d_v2"
    assert TrainConfig(method="mcnet_plus").model == "mcnet3d_v2"
    assert MCNetPlus(MCNet3d_v2(n_filters=4), _config()).rows == "all"
    assert MCNetPlus(MCNet3d_v2(n_filters=4), _config(consistency_rows="unlabeled")).rows == "unlabeled"
    with pytest.raises(ValueError, match="consistency_rows"):
        MCNetPlus(MCNet3d_v2(n_filters=4), _config(consistency_rows="labelled"))


def test_the_entry_script_sets_the_released_weight_ramp_and_network():
    from train_UGMCL_3D import build_parser, config_from_args

    module = importlib.import_module("train_mcnet_plus_3D")
    parser = build_parser(method="mcnet_plus")
    cfg = config_from_args(parser.parse_args(module.DEFAULTS), "mcnet_plus")
    assert (cfg.method, cfg.exp, cfg.model) == ("mcnet_plus", "BraTs2019_MCNetPlus", "mcnet3d_v2")
    assert (cfg.consistency, cfg.consistency_rampup, cfg.consistency_interval) == (1.0, 40.0, 150)
    mine = config_from_args(parser.parse_args([*module.DEFAULTS, "--consistency", "0.1"]), "mcnet_plus")
    assert mine.consistency == 0.1
