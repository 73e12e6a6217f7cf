"""UG-MCL objective against the golden values of the released code, and the method's training step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engine.config import TrainConfig
from methods.base import Batch
from methods.ugmcl import UGMCL, ground_truth_sdf, ugmcl_objective
from utils.sdf import compute_sdf_torch
from utils.uncertainty import entropy_of_mean_softmax, mc_dropout_uncertainty

GOLDEN_ITERATIONS = (0, 1234, 29999)


class _Replay(nn.Module):
    """Stand-in teacher returning the golden Monte-Carlo passes in order, as ``(tanh(z), z)``."""

    def __init__(self, stack: torch.Tensor) -> None:
        super().__init__()
        self.stack, self.next = stack, 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0] // self.stack.shape[1]
        z = self.stack[self.next : self.next + n].reshape(-1, *self.stack.shape[2:])
        self.next += n
        return torch.tanh(z), z


class _TinyDual(nn.Module):
    """A unet_3D_dt-like stand-in: conv, dropout, 1x1 head, returns ``(tanh(z), z)``."""

    def __init__(self, separate_sdf_head: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Conv3d(4, 2, 1)
        self.sdf_head = nn.Conv3d(4, 2, 1) if separate_sdf_head else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.drop(torch.relu(self.conv(x)))
        z = self.head(h)
        return torch.tanh(self.sdf_head(h) if self.sdf_head is not None else z), z


@pytest.fixture(scope="module")
def golden(golden_dir):
    return torch.load(golden_dir / "ugmcl_step_golden.pt", weights_only=True)


def _objective(golden, uncertainty, it, **kwargs):
    return ugmcl_objective(
        golden["student_dis"],
        golden["student_logits"],
        golden["teacher_logits"],
        uncertainty,
        golden["label"],
        golden["labeled_bs"],
        it,
        threshold_rampup=golden["max_iterations"],
        **kwargs,
    )


@pytest.mark.parametrize("chunk", [1, 0])
@pytest.mark.parametrize("it", GOLDEN_ITERATIONS)
def test_objective_reproduces_every_golden_term_of_the_released_code(golden, it, chunk):
    uncertainty, _ = mc_dropout_uncertainty(_Replay(golden["mc_logits"]), golden["image"], passes=8, chunk=chunk)
    expected = golden["results_by_iteration"][it]
    terms = _objective(golden, uncertainty, it)
    for name, value in expected.items():
        if isinstance(value, float):
            assert terms[name] == pytest.approx(value, rel=1e-9, abs=0), name
        else:
            torch.testing.assert_close(terms[name], value, atol=1e-6, rtol=1e-6, msg=name)


def test_uncertainty_from_the_stacked_passes_matches_golden(golden):
    uncertainty, _ = entropy_of_mean_softmax(golden["mc_logits"])
    torch.testing.assert_close(uncertainty, golden["results_by_iteration"][0]["uncertainty"], atol=1e-6, rtol=0)


def _random_terms(variant="released", beta=0.75, sdf_channels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 2, 4, 4, 4, generator=g)
    teacher_logits = torch.randn(3, 2, 4, 4, 4, generator=g)
    uncertainty = torch.rand(3, 1, 4, 4, 4, generator=g) * math.log(2)
    label = (torch.rand(3, 4, 4, 4, generator=g) > 0.6).long()
    sdf_head = torch.tanh(torch.randn(3, sdf_channels, 4, 4, 4, generator=g))
    teacher_sdf = torch.tanh(torch.randn(3, sdf_channels, 4, 4, 4, generator=g))
    paper = variant == "paper"
    return dict(
        student_dis=sdf_head if paper else torch.tanh(logits),
        student_logits=logits,
        teacher_logits=teacher_logits,
        uncertainty=uncertainty,
        label=label,
        labeled_bs=2,
        step=20000,
        threshold_rampup=30000,
        variant=variant,
        beta=beta,
        teacher_dis=teacher_sdf if paper else None,
    )


def test_paper_variant_adds_the_sdf_regression_of_the_labelled_rows():
    kw = _random_terms("paper")
    terms = ugmcl_objective(**kw)
    label = kw["label"][:2]
    gt = torch.stack([compute_sdf_torch(label == 0), compute_sdf_torch(label == 1)], dim=1)
    expected_sdf = torch.mean((kw["student_dis"][:2] - gt) ** 2)
    torch.testing.assert_close(terms["loss_sdf"], expected_sdf)
    half = 0.5 * (terms["loss_seg"] + terms["loss_seg_dice"] + terms["loss_dis_dice"])
    torch.testing.assert_close(terms["supervised_loss"], half + expected_sdf)
    torch.testing.assert_close(
        terms["loss"], terms["supervised_loss"] + terms["consistency_loss"] + terms["cross_task_loss"]
    )


def test_paper_variant_one_channel_head_regresses_the_foreground_sdf():
    kw = _random_terms("paper", sdf_channels=1)
    terms = ugmcl_objective(**kw)
    gt = compute_sdf_torch(kw["label"][:2] == 1).unsqueeze(1)
    torch.testing.assert_close(terms["loss_sdf"], torch.mean((kw["student_dis"][:2] - gt) ** 2))
    torch.testing.assert_close(ground_truth_sdf(kw["label"][:2], 1), gt)


def test_paper_variant_mixes_seg_and_sdf_consistency_with_beta():
    kw = _random_terms("paper", beta=0.75)
    terms = ugmcl_objective(**kw)
    mask = terms["mask"]
    p, q = torch.softmax(kw["student_logits"], 1), torch.softmax(kw["teacher_logits"], 1)
    seg = torch.sum(mask * (p - q) ** 2) / (2 * mask.sum())
    sdf = torch.sum(mask * (kw["student_dis"] - kw["teacher_dis"]) ** 2) / (2 * mask.sum())
    torch.testing.assert_close(terms["consistency_dist"], 0.5 * (0.75 * seg + 0.25 * sdf))
    torch.testing.assert_close(terms["consistency_loss"], terms["consistency_weight"] * terms["consistency_dist"])


def test_paper_variant_with_beta_one_has_the_released_intra_task_term():
    released = ugmcl_objective(**_random_terms("released"))
    kw = _random_terms("paper", beta=1.0)
    kw["student_dis"] = torch.tanh(kw["student_logits"])
    paper = ugmcl_objective(**kw)
    torch.testing.assert_close(paper["consistency_dist"], released["consistency_dist"])


def test_objective_refuses_invalid_inputs():
    kw = _random_terms()
    with pytest.raises(ValueError, match="variant"):
        ugmcl_objective(**{**kw, "variant": "other"})
    with pytest.raises(ValueError, match="labeled_bs"):
        ugmcl_objective(**{**kw, "labeled_bs": 0})
    with pytest.raises(ValueError, match="C >= 2 classes"):
        ugmcl_objective(**{**kw, "student_logits": torch.zeros(3, 1, 4, 4, 4)})
    with pytest.raises(ValueError, match="student_dis"):
        three = torch.zeros(3, 3, 4, 4, 4)
        ugmcl_objective(**{**kw, "student_logits": three, "teacher_logits": three})  # d still has 2 channels
    with pytest.raises(ValueError, match="uncertainty"):
        ugmcl_objective(**{**kw, "uncertainty": torch.zeros(3, 2, 4, 4, 4)})
    with pytest.raises(ValueError, match="teacher_dis"):
        ugmcl_objective(**{**_random_terms("paper"), "teacher_dis": None})


def _config(**overrides) -> TrainConfig:
    base = dict(max_iterations=100, mc_passes=3, mc_chunk=2, batch_size=4, labeled_bs=2, patch_size=(8, 8, 8))
    return TrainConfig(**{**base, **overrides})


def _batch(seed=0, batch=4, size=(8, 8, 8)) -> Batch:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 1, *size, generator=g)
    label = (image[:, 0] > 0.3).long()
    return Batch(image, label, labeled_bs=2)


@pytest.mark.parametrize("variant", ["released", "paper"])
def test_training_step_gives_a_finite_loss_with_gradients_only_on_the_student(variant):
    torch.manual_seed(0)
    student = _TinyDual(separate_sdf_head=variant == "paper")
    method = UGMCL(student, _config(variant=variant))
    loss, logs = method.training_step(_batch(), step=10)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters())
    assert {"loss", "loss_seg", "consistency_weight", "threshold", "mask_ratio", "cross_task_loss"} <= logs.keys()
    assert all(isinstance(v, float) for v in logs.values())
    assert logs["loss"] == pytest.approx(loss.item())
    assert method.images_to_log()["uncertainty"].shape == (8, 8, 8)
    if variant == "paper":
        assert "loss_sdf" in logs


def test_after_optimizer_step_moves_the_teacher_by_the_ema_formula():
    torch.manual_seed(0)
    student = _TinyDual()
    method = UGMCL(student, _config(ema_decay=0.99))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    for step in range(2):
        loss, _ = method.training_step(_batch(step), step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        before = [t.detach().clone() for t in method.teacher.parameters()]
        method.after_optimizer_step(step)
        alpha = min(1 - 1 / (step + 1), 0.99)  # 0 (a copy), then 0.5
        for t, b, s in zip(method.teacher.parameters(), before, student.parameters()):
            torch.testing.assert_close(t, alpha * b + (1 - alpha) * s.detach())
    assert not torch.equal(before[0], next(method.teacher.parameters()))


def test_teacher_state_round_trips():
    torch.manual_seed(0)
    method = UGMCL(_TinyDual(), _config())
    with torch.no_grad():
        for p in method.teacher.parameters():
            p.add_(1.0)
    other = UGMCL(_TinyDual(), _config())
    other.load_state_dict(method.state_dict())
    for a, b in zip(method.teacher.parameters(), other.teacher.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(KeyError, match="teacher"):
        other.load_state_dict({})


def test_invalid_options_are_refused_at_construction():
    for bad in (
        dict(variant="papr"),
        dict(mc_passes=0),
        dict(mc_chunk=-1),
        dict(beta=1.5),
        dict(num_classes=1),
        dict(ema_decay=2.0),
        dict(consistency_interval=0),
    ):
        with pytest.raises(ValueError):
            UGMCL(_TinyDual(), _config(**bad))


def test_single_output_network_is_refused_with_a_clear_error():
    method = UGMCL(nn.Conv3d(1, 2, 1), _config())
    with pytest.raises(ValueError, match="dual-task"):
        method.training_step(_batch(), 0)


def test_training_step_runs_on_unet_3D_dt():
    unet = pytest.importorskip("networks.unet_3D")
    torch.manual_seed(0)
    student = unet.unet_3D_dt(feature_scale=8, n_classes=2, in_channels=1)
    method = UGMCL(student, _config(mc_passes=2, mc_chunk=0))
    loss, _ = method.training_step(_batch(batch=2, size=(16, 16, 32)), step=0)
    loss.backward()
    assert torch.isfinite(loss) and student.final.weight.grad is not None


def test_objective_computes_in_float32_from_half_precision_outputs():
    kw = _random_terms()
    for key in ("student_dis", "student_logits", "teacher_logits"):
        kw[key] = kw[key].to(torch.bfloat16)
    terms = ugmcl_objective(**kw)
    assert terms["loss"].dtype == torch.float32 and terms["mask"].dtype == torch.float32
