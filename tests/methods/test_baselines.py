"""The baselines of paper Table 4: each loss against a reference assembled here with plain torch ops, a few training
steps on tiny networks, the network-form errors, and one end-to-end run per method through the shared loop."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.config import TrainConfig
from engine.trainer import train
from methods import METHODS
from methods.base import Batch
from methods.dtc import DTC, dtc_objective
from methods.entropy_min import EntropyMinimization, entropy_min_objective
from methods.mean_teacher import MeanTeacher, mean_teacher_objective
from methods.supervised import Supervised, supervised_objective
from methods.uamt import UAMT, uamt_objective
from methods.urpc import URPC, urpc_objective
from networks.unet_3D import unet_3D, unet_3D_ds, unet_3D_dt
from networks.vnet import VNet_dt
from synthetic_h5 import write_synthetic_h5_dataset

LB = 2  # labelled rows in the fixed-tensor tests
STEP = 3000  # w(t) = 0.1 * exp(-5 (1 - 20/200)^2) with the default ramp (interval 150, length 200)
WEIGHT = 0.1 * math.exp(-5.0 * (1.0 - (STEP // 150) / 200.0) ** 2)


# ----------------------------------------------------------------------------------------------
# references written out with torch ops
# ----------------------------------------------------------------------------------------------
def _ref_ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    log_p = z - torch.logsumexp(z, dim=1, keepdim=True)
    return -log_p.gather(1, y.unsqueeze(1)).mean()


def _ref_dice(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.float()
    return 1 - (2 * (s * t).sum() + 1e-5) / ((s * s).sum() + (t * t).sum() + 1e-5)


def _ref_supervised(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSL4MIS: 0.5 * (CE + DiceLoss(C)(softmax(z), y)), DiceLoss averaging every class."""
    p = torch.exp(z) / torch.exp(z).sum(dim=1, keepdim=True)
    dice = sum(_ref_dice(p[:, c], y == c) for c in range(z.shape[1])) / z.shape[1]
    return 0.5 * (_ref_ce(z, y) + dice)


def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def _fixed(seed: int = 0, batch: int = 4, classes: int = 2, size: int = 4):
    gen = torch.Generator().manual_seed(seed)
    z = 2 * torch.randn(batch, classes, size, size, size, generator=gen)
    t = 2 * torch.randn(batch, classes, size, size, size, generator=gen)
    y = torch.randint(0, classes, (batch, size, size, size), generator=gen)
    return z, t, y


# ----------------------------------------------------------------------------------------------
# losses on fixed tensors
# ----------------------------------------------------------------------------------------------
def test_supervised_loss_is_half_ce_plus_class_mean_dice_of_the_labelled_rows():
    z, _, y = _fixed()
    terms = supervised_objective(z, y, LB)
    torch.testing.assert_close(terms["loss"], _ref_supervised(z[:LB], y[:LB]))
    # the unlabelled rows are not read
    z2, y2 = z.clone(), y.clone()
    z2[LB:], y2[LB:] = 100.0, 1
    torch.testing.assert_close(supervised_objective(z2, y2, LB)["loss"], terms["loss"])


def test_supervised_loss_can_use_the_foreground_dice_of_ua_mt():
    z, _, y = _fixed()
    p = _softmax(z[:LB])
    expected = 0.5 * (_ref_ce(z[:LB], y[:LB]) + _ref_dice(p[:, 1], y[:LB] == 1))
    torch.testing.assert_close(supervised_objective(z, y, LB, dice="foreground")["loss"], expected)


@pytest.mark.parametrize("rows", ["unlabeled", "all"])
def test_mean_teacher_loss_matches_the_reference(rows):
    z, t, y = _fixed()
    first = LB if rows == "unlabeled" else 0
    teacher = t[first:]
    terms = mean_teacher_objective(z, teacher, y, LB, STEP, rows=rows)
    dist = ((_softmax(z[first:]) - _softmax(teacher)) ** 2).mean()
    assert terms["consistency_weight"] == pytest.approx(WEIGHT, rel=1e-12)
    torch.testing.assert_close(terms["consistency_dist"], dist)
    torch.testing.assert_close(terms["loss"], _ref_supervised(z[:LB], y[:LB]) + WEIGHT * dist)


def test_mean_teacher_refuses_a_teacher_output_of_the_wrong_rows():
    z, t, y = _fixed()
    with pytest.raises(ValueError, match="same shape"):
        mean_teacher_objective(z, t, y, LB, STEP, rows="unlabeled")


@pytest.mark.parametrize("step", [0, 1234, 29999])
def test_uamt_loss_masks_the_consistency_with_the_ramped_entropy_threshold(step):
    z, t, y = _fixed(seed=1)
    q = _softmax(t[LB:])
    gen = torch.Generator().manual_seed(2)
    uncertainty = math.log(2.0) * torch.rand(2, 1, 4, 4, 4, generator=gen)
    uncertainty[..., 0] = math.log(2.0)  # the largest two-class entropy: above the threshold at every step
    terms = uamt_objective(z, t[LB:], uncertainty, y, LB, step, threshold_rampup=30000)

    threshold = (0.75 + 0.25 * math.exp(-5.0 * (1.0 - step / 30000) ** 2)) * math.log(2.0)
    mask = (uncertainty < threshold).float()
    # the released line: sum(mask * dist) / (2 * sum(mask) + 1e-16), the mask broadcasting over the two classes
    dist = torch.sum(mask * (_softmax(z[LB:]) - q) ** 2) / (2 * torch.sum(mask) + 1e-16)
    weight = 0.1 * math.exp(-5.0 * (1.0 - (step // 150) / 200.0) ** 2)
    assert terms["threshold"] == pytest.approx(threshold, rel=1e-12)
    assert 0 < mask.sum() < mask.numel()  # the threshold really splits the voxels, so the test can fail
    torch.testing.assert_close(terms["mask"], mask)
    torch.testing.assert_close(terms["consistency_dist"], dist)
    torch.testing.assert_close(terms["loss"], _ref_supervised(z[:LB], y[:LB]) + weight * dist)


@pytest.mark.parametrize("rows", ["all", "unlabeled"])
def test_entropy_minimisation_loss_matches_the_reference(rows):
    z, _, y = _fixed(seed=3)
    first = 0 if rows == "all" else LB
    p = _softmax(z[first:])
    entropy = (-(p * torch.log(p + 1e-6)).sum(dim=1)).mean() / math.log(2.0)
    terms = entropy_min_objective(z, y, LB, STEP, rows=rows)
    torch.testing.assert_close(terms["entropy"], entropy)
    torch.testing.assert_close(terms["loss"], _ref_supervised(z[:LB], y[:LB]) + WEIGHT * entropy)


def test_entropy_minimisation_defaults_to_the_whole_batch_as_ssl4mis():
    z, _, y = _fixed(seed=3)
    assert entropy_min_objective(z, y, LB, STEP)["entropy"] == entropy_min_objective(z, y, LB, STEP, rows="all")[
        "entropy"
    ]


@pytest.mark.parametrize("dis_channels", [2, 1])
def test_dtc_loss_matches_the_reference(dis_channels):
    z, _, y = _fixed(seed=4)
    gen = torch.Generator().manual_seed(5)
    d = torch.tanh(0.01 * torch.randn(4, dis_channels, 4, 4, 4, generator=gen))
    gt = torch.rand(LB, dis_channels, 4, 4, 4, generator=gen) * 2 - 1
    terms = dtc_objective(d, z, y, LB, STEP, gt_sdf=gt)

    p = _softmax(z)
    sup = 0.5 * (_ref_ce(z[:LB], y[:LB]) + _ref_dice(p[:LB, 1], y[:LB] == 1)) + 0.3 * ((d[:LB] - gt) ** 2).mean()
    target = p if dis_channels == 2 else p[:, 1:]
    dtc = ((1 / (1 + torch.exp(1500 * d)) - target) ** 2).mean()
    torch.testing.assert_close(terms["supervised_loss"], sup)
    torch.testing.assert_close(terms["consistency_dist"], dtc)
    torch.testing.assert_close(terms["loss"], sup + WEIGHT * dtc)


def test_dtc_regresses_an_empty_label_to_the_all_zero_sdf():
    z, _, _ = _fixed(seed=4)
    d = torch.rand(4, 2, 4, 4, 4) - 0.5
    y = torch.zeros(4, 4, 4, 4, dtype=torch.long)
    terms = dtc_objective(d, z, y, LB, STEP)
    # channel 1 (foreground) of an empty mask: all zeros (DTC); channel 0 (background everywhere): all -1
    expected = 0.5 * ((d[:LB, 1] ** 2).mean() + ((d[:LB, 0] + 1) ** 2).mean())
    torch.testing.assert_close(terms["loss_sdf"], expected)


@pytest.mark.parametrize("rows", ["unlabeled", "all"])
def test_urpc_loss_matches_the_ssl4mis_formulation(rows):
    gen = torch.Generator().manual_seed(6)
    levels = [2 * torch.randn(4, 2, 4, 4, 4, generator=gen) for _ in range(4)]
    y = torch.randint(0, 2, (4, 4, 4, 4), generator=gen)
    terms = urpc_objective(levels, y, LB, STEP, rows=rows)

    first = LB if rows == "unlabeled" else 0
    soft = [_softmax(z) for z in levels]
    sup = sum(_ref_ce(z[:LB], y[:LB]) for z in levels) + sum(
        (_ref_dice(p[:LB, 0], y[:LB] == 0) + _ref_dice(p[:LB, 1], y[:LB] == 1)) / 2 for p in soft
    )
    sup = sup / 8
    preds = sum(soft) / 4
    kl = nn.KLDivLoss(reduction="none")
    cons = 0.0
    for p in soft:
        variance = torch.sum(kl(torch.log(p[first:]), preds[first:]), dim=1, keepdim=True)
        exp_variance = torch.exp(-variance)
        dist = (preds[first:] - p[first:]) ** 2
        cons = cons + torch.mean(dist * exp_variance) / (torch.mean(exp_variance) + 1e-8) + torch.mean(variance)
    cons = cons / 4
    torch.testing.assert_close(terms["supervised_loss"], sup)
    torch.testing.assert_close(terms["consistency_dist"], cons)
    torch.testing.assert_close(terms["loss"], sup + WEIGHT * cons)
    assert terms["uncertainty"].shape == (4 - first, 1, 4, 4, 4)


def test_urpc_gradient_reaches_every_level():
    levels = [torch.randn(4, 2, 4, 4, 4, requires_grad=True) for _ in range(4)]
    y = torch.randint(0, 2, (4, 4, 4, 4))
    urpc_objective(levels, y, LB, STEP)["loss"].backward()
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in levels)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda z, t, y: supervised_objective(z, y, 0), "labeled_bs"),
        (lambda z, t, y: mean_teacher_objective(z, t, y, 4, STEP), "needs unlabelled rows"),
        (lambda z, t, y: entropy_min_objective(z, y, LB, STEP, rows="labeled"), "rows must be"),
        (lambda z, t, y: urpc_objective([z, z[:, :1]], y, LB, STEP), "same shape"),
        (lambda z, t, y: dtc_objective(z[:, :1, :2], z, y, LB, STEP), "dis"),
    ],
)
def test_objectives_refuse_invalid_inputs(call, message):
    z, t, y = _fixed()
    with pytest.raises(ValueError, match=message):
        call(z, t, y)


# ----------------------------------------------------------------------------------------------
# training steps on tiny networks
# ----------------------------------------------------------------------------------------------
def _config(**overrides) -> TrainConfig:
    cfg = TrainConfig(mc_passes=2, mc_chunk=0, max_iterations=100, consistency_interval=1, consistency_rampup=0)
    return replace(cfg, **overrides)


def _batch(batch: int = 2, labeled_bs: int = 1, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 1, 32, 32, 32, generator=gen)
    label = torch.zeros(batch, 32, 32, 32, dtype=torch.long)
    label[:, 10:20, 12:22, 8:18] = 1
    return Batch(image, label, labeled_bs)


def _network(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "unet_3D":
        return unet_3D(feature_scale=16)
    if name == "unet_3D_dt":
        return unet_3D_dt(feature_scale=16)
    if name == "unet_3D_ds":
        return unet_3D_ds(feature_scale=16)
    return VNet_dt(n_filters=4, has_dropout=True)


STEP_CASES = [
    (Supervised, "unet_3D"),
    (Supervised, "unet_3D_dt"),
    (MeanTeacher, "unet_3D"),
    (UAMT, "unet_3D_dt"),
    (EntropyMinimization, "unet_3D"),
    (DTC, "vnet_dt"),
    (URPC, "unet_3D_ds"),
]


@pytest.mark.parametrize("method_cls, net_name", STEP_CASES)
def test_training_steps_give_finite_losses_and_gradients_only_on_the_student(method_cls, net_name):
    student = _network(net_name)
    method = method_cls(student, _config())
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    batch = _batch(batch=1 if not method_cls.uses_unlabeled else 2)
    for step in range(2):
        loss, logs = method.training_step(batch, step)
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert all(math.isfinite(v) for v in logs.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
        assert any(p.grad.abs().sum() > 0 for p in student.parameters())
        teacher = getattr(method, "teacher", None)
        if teacher is not None:
            assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
        optimizer.step()
        method.after_optimizer_step(step)
    assert set(method.images_to_log()) <= {"uncertainty", "dis_to_mask"}


@pytest.mark.parametrize("method_cls", [MeanTeacher, UAMT])
def test_teacher_is_the_student_after_the_first_ema_update_and_round_trips(method_cls):
    student = _network("unet_3D")
    method = method_cls(student, _config())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    method.after_optimizer_step(0)  # alpha = min(1 - 1/1, 0.99) = 0: the teacher becomes the student
    for t, s in zip(method.teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, s)
    fresh = method_cls(_network("unet_3D"), _config())
    fresh.load_state_dict(method.state_dict())
    for t, s in zip(fresh.teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t, s)


def test_consistency_rows_option_feeds_the_teacher_the_whole_batch():
    seen = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv3d(1, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            return self.conv(x)

    cfg = _config()
    MeanTeacher(Probe(), cfg).training_step(_batch(batch=3), 0)
    cfg.consistency_rows = "all"  # the optional option, read with getattr
    MeanTeacher(Probe(), cfg).training_step(_batch(batch=3), 0)
    assert seen == [3, 2, 3, 3]  # student, teacher on the 2 unlabelled rows; then student, teacher on all 3


@pytest.mark.parametrize(
    "method_cls, net_name, message",
    [
        (Supervised, "unet_3D_ds", r"--method supervised needs a --model .*unet_3D_ds is for --method urpc"),
        (MeanTeacher, "unet_3D_ds", r"--method mean_teacher needs a --model"),
        (EntropyMinimization, "unet_3D_ds", r"--method entropy_min needs a --model"),
        (URPC, "unet_3D", r"--method urpc needs a deep-supervision --model"),
        (URPC, "unet_3D_dt", r"--method urpc needs a deep-supervision --model"),
        (DTC, "unet_3D", r"--method dtc needs a dual-task --model"),
    ],
)
def test_a_network_of_the_wrong_form_is_refused_with_a_clear_error(method_cls, net_name, message):
    method = method_cls(_network(net_name), _config())
    with pytest.raises(ValueError, match=message):
        method.training_step(_batch(), 0)


def test_dtc_refuses_unet_3D_dt_whose_distance_is_tanh_of_the_logits():
    with pytest.raises(ValueError, match="--model vnet_dt"):
        DTC(_network("unet_3D_dt"), _config())


@pytest.mark.parametrize(
    "method_cls, overrides, message",
    [
        (MeanTeacher, {"ema_decay": 1.5}, "ema_decay"),
        (UAMT, {"mc_passes": 0}, "mc_passes"),
        (EntropyMinimization, {"consistency_interval": 0}, "consistency_interval"),
        (URPC, {"consistency_rampup": -1.0}, "consistency_rampup"),
        (DTC, {"num_classes": 1}, "num_classes"),
        (Supervised, {"num_classes": 1}, "num_classes"),
    ],
)
def test_invalid_options_are_refused_at_construction(method_cls, overrides, message):
    net = _network("vnet_dt" if method_cls is DTC else "unet_3D")
    with pytest.raises(ValueError, match=message):
        method_cls(net, _config(**overrides))


def test_an_unknown_consistency_rows_value_is_refused():
    cfg = _config()
    cfg.consistency_rows = "labelled"
    with pytest.raises(ValueError, match="consistency_rows"):
        MeanTeacher(_network("unet_3D"), cfg)


def test_every_baseline_is_in_the_methods_table_next_to_ugmcl():
    assert {"ugmcl", "supervised", "mean_teacher", "uamt", "entropy_min", "dtc", "urpc"} <= set(METHODS)
    assert METHODS["supervised"].uses_unlabeled is False
    assert all(METHODS[m].uses_unlabeled for m in ("mean_teacher", "uamt", "entropy_min", "dtc", "urpc"))


# ----------------------------------------------------------------------------------------------
# end to end through the shared loop
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("brats_baselines")
    write_synthetic_h5_dataset(root, 7, (36, 36, 34), 4, n_val=1, n_test=1)
    return root


END_TO_END = [
    ("supervised", "unet_3D", False),
    ("mean_teacher", "unet_3D", True),
    ("uamt", "unet_3D_dt", True),
    ("entropy_min", "unet_3D", False),
    ("dtc", "vnet_dt", False),
    ("urpc", "unet_3D_ds", False),
]


@pytest.mark.parametrize("method, model, has_teacher", END_TO_END)
def test_each_baseline_trains_end_to_end_through_the_shared_loop(tiny_root, tmp_path, method, model, has_teacher):
    cfg = TrainConfig(
        root_path=str(tiny_root), exp="tiny", method=method, model=model, labeled_num=2, patch_size=(32, 32, 32),
        feature_scale=16, max_iterations=2, batch_size=2, labeled_bs=1, mc_passes=2, val_interval=2,
        save_interval=2, num_workers=0, device="cpu", stride_xy=16, stride_z=16,
    )
    summary = train(cfg, model_dir=tmp_path, progress=False)
    out = tmp_path / "tiny_2" / model
    assert summary["iterations"] == 2
    assert "iteration 2 :" in (out / "log.txt").read_text()
    best = torch.load(out / f"{model}_best_model.pth", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in best.values())
    latest = torch.load(out / "checkpoint_latest.pth", weights_only=True)
    assert ("teacher" in latest["method"]) is has_teacher
    assert all(torch.isfinite(v).all() for v in latest["student"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    "script, exp, model",
    [
        ("train_supervised_3D", "BraTs2019_Supervised", "unet_3D_dt"),
        ("train_mean_teacher_3D", "BraTs2019_Mean_Teacher", "unet_3D_dt"),
        ("train_uamt_3D", "BraTs2019_UAMT", "unet_3D_dt"),
        ("train_entropy_min_3D", "BraTs2019_Entropy_Minimization", "unet_3D_dt"),
        ("train_dtc_3D", "BraTs2019_DTC", "vnet_dt"),
        ("train_urpc_3D", "BraTs2019_URPC", "unet_3D_ds"),
    ],
)
def test_entry_scripts_give_each_baseline_its_own_run_folder_and_a_network_it_accepts(script, exp, model):
    import importlib

    from train_UGMCL_3D import build_parser, config_from_args

    module = importlib.import_module(script)
    method = script[len("train_") : -len("_3D")]
    parser = build_parser(method=method)
    cfg = config_from_args(parser.parse_args(module.DEFAULTS), method)
    assert (cfg.method, cfg.exp, cfg.model) == (method, exp, model)
    overridden = config_from_args(parser.parse_args([*module.DEFAULTS, "--exp", "mine", "--model", "unet_3D"]), method)
    assert (overridden.exp, overridden.model) == ("mine", "unet_3D")
