"""BCP (issue #20): every term against hand-computed values on tiny tensors, a training step of each stage at C = 2
and C = 3, the teacher set from the student at the stage switch, and exact resume (state_dict and the shared loop)."""

from __future__ import annotations

import io
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import train_bcp_3D
import train_UGMCL_3D
from engine.config import TrainConfig
from engine.trainer import train
from methods import METHODS
from methods.base import Batch
from methods.bcp import (
    BCP,
    bcp_dice_loss,
    copy_paste,
    cuboid_mask,
    largest_component,
    mix_loss,
    mixed_target,
    pretrain_objective,
    pseudo_label,
    selftrain_objective,
)
from networks.vnet import VNet
from synthetic_h5 import write_synthetic_h5_dataset

S = 1e-5  # mask_DiceLoss's smooth
LN2, LN3 = math.log(2.0), math.log(3.0)


# ----------------------------------------------------------------------------------------------
# the cuboid and the copy-paste
# ----------------------------------------------------------------------------------------------
def test_cuboid_mask_is_one_box_of_the_floored_fraction_at_the_drawn_offsets():
    mask = cuboid_mask((3, 4, 5), 0.5, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # the offsets, drawn in axis order: sizes (1, 2, 2)
    starts = [int(torch.randint(0, high, (1,), generator=gen)) for high in (3, 3, 4)]
    expected = torch.zeros(3, 4, 5, dtype=torch.bool)
    expected[starts[0]:starts[0] + 1, starts[1]:starts[1] + 2, starts[2]:starts[2] + 2] = True
    assert mask.dtype == torch.bool and torch.equal(mask, expected)


def test_cuboid_sides_are_two_thirds_as_bcp_and_the_whole_volume_at_fraction_one():
    mask = cuboid_mask((96, 112, 80), 2 / 3, torch.Generator().manual_seed(0))
    nonzero = mask.nonzero()
    assert tuple((nonzero.max(0).values - nonzero.min(0).values + 1).tolist()) == (64, 74, 53)  # BCP: 74, 53
    assert mask.sum() == 64 * 74 * 53
    assert cuboid_mask((2, 3, 4), 1.0).all()


def test_every_cuboid_offset_can_be_drawn_the_last_one_too():
    gen = torch.Generator().manual_seed(0)
    seen = {int(cuboid_mask((3, 1, 1), 1 / 3, gen).nonzero()[0, 0]) for _ in range(60)}
    assert seen == {0, 1, 2}  # BCP's randint(0, side - size) never draws 2


def test_cuboid_mask_follows_the_global_torch_rng_so_a_restored_state_redraws_it():
    torch.manual_seed(11)
    state = torch.get_rng_state()
    first = cuboid_mask((8, 8, 8), 0.5)
    torch.set_rng_state(state)
    assert torch.equal(cuboid_mask((8, 8, 8), 0.5), first)


@pytest.mark.parametrize("shape, fraction, message", [((4, 4, 4), 0.0, "fraction"), ((4, 4, 4), 1.5, "fraction"),
                                                      ((4, 0, 4), 0.5, "sides >= 1")])
def test_cuboid_mask_refuses_invalid_arguments(shape, fraction, message):
    with pytest.raises(ValueError, match=message):
        cuboid_mask(shape, fraction)


def test_copy_paste_takes_the_first_image_inside_the_mask_and_the_second_outside():
    a = torch.arange(1.0, 9.0).reshape(1, 1, 2, 2, 2)
    b = -a
    mask = torch.tensor([[[True, False], [False, False]], [[False, False], [False, True]]])
    out = copy_paste(a, b, mask)
    assert out.flatten().tolist() == [1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, 8.0]
    # arithmetically M a + (1 - M) b, bit for bit
    m = mask.float()
    assert torch.equal(out, m * a + (1 - m) * b)


def test_copy_paste_accepts_one_mask_per_row():
    a, b = torch.ones(2, 1, 1, 1, 2), torch.zeros(2, 1, 1, 1, 2)
    mask = torch.tensor([[True, False], [False, True]]).reshape(2, 1, 1, 2)
    assert copy_paste(a, b, mask).flatten().tolist() == [1.0, 0.0, 0.0, 1.0]


def test_mixed_target_is_the_ground_truth_inside_and_the_pseudo_label_outside():
    y_l = torch.ones(1, 1, 2, 2, dtype=torch.long)
    pl_u = torch.full((1, 1, 2, 2), 2, dtype=torch.long)
    mask = torch.tensor([[[True, False], [True, False]]])
    y = mixed_target(y_l, pl_u, mask)
    assert y.dtype == torch.int64 and y.flatten().tolist() == [1, 2, 1, 2]
    assert mixed_target(pl_u, y_l, mask).flatten().tolist() == [2, 1, 2, 1]  # Y2, the reverse


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: copy_paste(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 3), torch.ones(2, 2, 2)), "same shape"),
        (lambda: copy_paste(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2), torch.ones(2, 2, 3)), "mask"),
        (lambda: mixed_target(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), torch.ones(2, 2, 2)), "integer"),
        (lambda: mix_loss(torch.zeros(1, 2, 2, 2, 2), torch.zeros(1, 2, 2, 3, dtype=torch.long),
                          torch.ones(2, 2, 2)), "without the class axis"),
    ],
)
def test_the_terms_refuse_shapes_that_do_not_fit(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------------------------
# the losses, by hand
# ----------------------------------------------------------------------------------------------
def _two_voxels() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Voxel 0 inside the cuboid with softmax (1/2, 1/2) and label 1; voxel 1 outside, (3/4, 1/4), label 0."""
    logits = torch.tensor([[0.0, LN3], [0.0, 0.0]]).reshape(1, 2, 1, 1, 2)
    target = torch.tensor([1, 0]).reshape(1, 1, 1, 2)
    mask = torch.tensor([True, False]).reshape(1, 1, 2)
    return logits, target, mask


def test_bcp_dice_is_per_class_background_included_with_p_plus_t_below():
    prob = torch.full((1, 3, 1, 1, 1), 1 / 3)
    target = torch.full((1, 1, 1, 1), 2)
    expected = 1 - (2 * (S / (1 / 3 + S)) + (2 / 3 + S) / (4 / 3 + S)) / 3
    assert bcp_dice_loss(prob, target).item() == pytest.approx(expected, rel=1e-6)
    # per sample: two rows, one perfect (loss 0 per class) and one wrong
    prob2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).reshape(2, 2, 1, 1, 1)
    target2 = torch.tensor([0, 1]).reshape(2, 1, 1, 1)
    row0 = [(2 + S) / (2 + S), S / S]  # class 0 matched, class 1 absent from both: 1
    row1 = [S / (1 + S), S / (1 + S)]
    assert bcp_dice_loss(prob2, target2).item() == pytest.approx(1 - sum(row0 + row1) / 4, rel=1e-6)


def test_mix_loss_matches_the_hand_value_with_the_labelled_voxels_at_weight_one():
    logits, target, mask = _two_voxels()
    ce_in, ce_out = LN2, math.log(4 / 3)
    dice_in = 1 - (S / (0.5 + S) + (1 + S) / (1.5 + S)) / 2
    dice_out = 1 - ((1.5 + S) / (1.75 + S) + S / (0.25 + S)) / 2
    expected = 0.5 * (1.0 * (ce_in + dice_in) + 0.5 * (ce_out + dice_out))
    assert mix_loss(logits, target, mask, 1.0, 0.5).item() == pytest.approx(expected, rel=1e-6)
    swapped = 0.5 * (0.5 * (ce_in + dice_in) + 1.0 * (ce_out + dice_out))
    assert mix_loss(logits, target, mask, 0.5, 1.0).item() == pytest.approx(swapped, rel=1e-6)


def test_an_empty_region_adds_nothing_to_the_mix_loss():
    logits, target, _ = _two_voxels()
    everywhere = torch.ones(1, 1, 2, dtype=torch.bool)
    whole = pretrain_objective(logits, target)
    assert mix_loss(logits, target, everywhere, 1.0, 0.5).item() == pytest.approx(whole["loss"].item(), rel=1e-6)
    assert mix_loss(logits, target, ~everywhere, 1.0, 0.5).item() == pytest.approx(0.5 * whole["loss"].item(),
                                                                                   rel=1e-6)


def test_pretrain_loss_is_half_of_ce_plus_dice_on_the_mixed_label():
    logits, target, _ = _two_voxels()
    ce = (LN2 + math.log(4 / 3)) / 2
    # over both voxels: class 0 p = (1/2, 3/4), t = (0, 1); class 1 p = (1/2, 1/4), t = (1, 0)
    dice = 1 - ((1.5 + S) / (2.25 + S) + (1 + S) / (1.75 + S)) / 2
    terms = pretrain_objective(logits, target)
    assert terms["loss_ce"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["loss_dice"].item() == pytest.approx(dice, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(0.5 * (ce + dice), rel=1e-6)


def test_selftrain_loss_weights_the_unlabelled_voxels_by_alpha_in_both_directions():
    logits, target, mask = _two_voxels()
    other = torch.tensor([[LN2, 0.0], [0.0, LN2]]).reshape(1, 2, 1, 1, 2)
    terms = selftrain_objective(logits, target, other, 1 - target, mask, u_weight=0.25)
    torch.testing.assert_close(terms["loss_mix1"], mix_loss(logits, target, mask, 1.0, 0.25))
    torch.testing.assert_close(terms["loss_mix2"], mix_loss(other, 1 - target, mask, 0.25, 1.0))
    torch.testing.assert_close(terms["loss"], terms["loss_mix1"] + terms["loss_mix2"])


def test_pseudo_label_is_the_teacher_argmax():
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [0.0, 2.0, 0.0]]).reshape(1, 3, 1, 1, 3)
    assert pseudo_label(z).flatten().tolist() == [0, 2, 1]


def test_largest_component_keeps_the_biggest_blob_of_each_foreground_class():
    label = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 0, 0, 0], [2, 0, 0, 2, 2]]).reshape(1, 1, 3, 5)
    expected = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 2, 2]]).reshape(1, 1, 3, 5)
    assert torch.equal(largest_component(label, 3), expected)
    # 26-connectivity, as skimage.measure.label in BCP: the diagonal pair is one component of 2
    diagonal = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0]]).reshape(1, 1, 2, 4)
    assert largest_component(diagonal, 2).flatten().tolist() == [1, 0, 0, 0, 0, 1, 0, 0]
    assert torch.equal(largest_component(torch.zeros(2, 2, 2, 2, dtype=torch.long), 2), torch.zeros(2, 2, 2, 2,
                                                                                                    dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """Conv -> ReLU -> Dropout3d -> 1x1 conv: dropout makes the random stream matter for the resume tests."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.drop = nn.Dropout3d(0.3)
        self.out = nn.Conv3d(4, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.relu(self.conv(x))))


def _config(**overrides) -> TrainConfig:
    return replace(TrainConfig(method="bcp", batch_size=2, labeled_bs=1, max_iterations=10), **overrides)


def _batch(rows: int = 2, labeled_bs: int = 1, classes: int = 2, seed: int = 0, size: int = 8) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(rows, 1, size, size, size, generator=gen)
    label = torch.zeros(rows, size, size, size, dtype=torch.long)
    label[:, 1:5, 2:6, 1:6] = 1
    if classes > 2:
        label[:, 5:8, 4:8, 5:8] = 2
    return Batch(image, label, labeled_bs)


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("step", [0, 2])  # stage 1, stage 2 (bcp_pretrain_iterations = 2)
@pytest.mark.parametrize("rows", [2, 4])  # one labelled row (a = b), and the halves of two
def test_a_step_of_each_stage_gives_a_finite_loss_and_gradients_on_the_student_only(classes, step, rows):
    torch.manual_seed(0)
    student = TinyNet(classes)
    method = BCP(student, _config(num_classes=classes, bcp_pretrain_iterations=2, batch_size=rows,
                                  labeled_bs=rows // 2))
    loss, logs = method.training_step(_batch(rows, rows // 2, classes), step)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(math.isfinite(v) for v in logs.values())
    assert set(logs) == ({"loss_ce", "loss_dice"} if step == 0 else {"loss_mix1", "loss_mix2", "pseudo_foreground"})
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert any(p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())


def test_a_vnet_with_batch_norm_trains_a_self_training_step():
    torch.manual_seed(0)
    student = VNet(n_filters=4, normalization="batchnorm", has_dropout=True)
    method = BCP(student, _config(bcp_pretrain_iterations=0, batch_size=4, labeled_bs=2))
    loss, _ = method.training_step(_batch(rows=4, labeled_bs=2, size=32), 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in student.parameters())


def test_stage_switches_at_bcp_pretrain_iterations():
    method = BCP(TinyNet(), _config(bcp_pretrain_iterations=3))
    assert [method.stage(t) for t in range(5)] == ["pretrain"] * 3 + ["selftrain"] * 2
    assert BCP(TinyNet(), _config(bcp_pretrain_iterations=0)).stage(0) == "selftrain"


def _steps(method: BCP, optimizer: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        loss, _ = method.training_step(_batch(seed=step), step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(step)


def test_the_teacher_is_the_student_at_the_stage_switch_and_untouched_before():
    torch.manual_seed(0)
    student = TinyNet()
    method = BCP(student, _config(bcp_pretrain_iterations=2))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    start = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    _steps(method, optimizer, range(2))
    assert all(torch.equal(v, start[k]) for k, v in method.teacher.state_dict().items())  # no EMA in stage 1
    assert not method.teacher_initialised and method.pretrain_weights() is None
    end_of_stage_1 = {k: v.clone() for k, v in student.state_dict().items()}
    assert any(not torch.equal(v, start[k]) for k, v in end_of_stage_1.items())  # the check below can fail

    method.training_step(_batch(seed=2), 2)  # the first self-training step, before its optimiser step
    assert method.teacher_initialised
    for name, value in method.teacher.state_dict().items():
        assert torch.equal(value, end_of_stage_1[name]), name
    assert all(torch.equal(method.pretrain_weights()[k], v) for k, v in end_of_stage_1.items())
    assert all(not p.requires_grad for p in method.teacher.parameters())


def _round_trip(state: dict) -> dict:
    """Through torch.save / torch.load(weights_only=True), as checkpoint_latest.pth."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("own_generator", [False, True])
@pytest.mark.parametrize("stop", [1, 2, 3])  # inside stage 1, at the switch, inside stage 2
def test_a_state_dict_round_trip_resumes_identically(stop, own_generator):
    cfg = _config(bcp_pretrain_iterations=2, ema_decay=0.9)

    def build(seed: int = 7) -> tuple[BCP, torch.optim.Optimizer]:
        torch.manual_seed(0)
        student = TinyNet()
        generator = torch.Generator().manual_seed(seed) if own_generator else None
        method = BCP(student, cfg, generator=generator)
        return method, torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)

    whole, whole_opt = build()
    torch.manual_seed(5)
    _steps(whole, whole_opt, range(5))

    first, first_opt = build()
    torch.manual_seed(5)
    _steps(first, first_opt, range(stop))
    saved = _round_trip({"student": first.student.state_dict(), "method": first.state_dict(),
                         "optimizer": first_opt.state_dict(), "rng": torch.get_rng_state()})
    resumed, resumed_opt = build(seed=99)  # another generator seed: its state must come from the checkpoint
    resumed.student.load_state_dict(saved["student"])
    resumed.load_state_dict(saved["method"])
    resumed_opt.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    _steps(resumed, resumed_opt, range(stop, 5))

    for net_a, net_b in ((whole.student, resumed.student), (whole.teacher, resumed.teacher)):
        for (name, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
            assert torch.equal(a, b), name
    assert any(not torch.equal(a, b) for a, b in zip(whole.teacher.parameters(), whole.student.parameters()))
    assert all(torch.equal(whole.pretrain_weights()[k], v) for k, v in resumed.pretrain_weights().items())


def test_load_state_dict_refuses_a_state_without_the_teacher_flag():
    method = BCP(TinyNet(), _config())
    with pytest.raises(KeyError, match="teacher_initialised"):
        method.load_state_dict({"teacher": method.teacher.state_dict()})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 5, "labeled_bs": 2}, "--batch_size must be twice --labeled_bs"),
        ({"bcp_mask_ratio": 0.0}, "bcp_mask_ratio"),
        ({"bcp_u_weight": -1.0}, "bcp_u_weight"),
        ({"bcp_pretrain_iterations": -1}, "bcp_pretrain_iterations"),
        ({"bcp_largest_cc": 2}, "bcp_largest_cc"),
    ],
)
def test_invalid_options_are_refused_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        BCP(TinyNet(), _config(**overrides))


def test_a_batch_with_other_than_one_unlabelled_row_per_labelled_row_is_refused_in_stage_2():
    method = BCP(TinyNet(), _config(bcp_pretrain_iterations=0))
    with pytest.raises(ValueError, match="as many unlabelled as labelled rows"):
        method.training_step(_batch(rows=3, labeled_bs=1), 0)


def test_bcp_is_registered_and_trains_a_vnet_on_the_v_net_datasets():
    assert METHODS["bcp"] is BCP and BCP.uses_unlabeled
    assert TrainConfig(method="bcp", dataset="la").model == "vnet"
    assert TrainConfig(method="bcp", dataset="pancreas").model == "vnet"
    assert TrainConfig(method="bcp").model == "unet_3D_dt"


def test_the_entry_script_passes_the_bcp_options_into_the_config():
    parser = train_UGMCL_3D.build_parser(method="bcp")
    args = parser.parse_args([*train_bcp_3D.DEFAULTS, "--bcp_pretrain_iterations", "7", "--bcp_u_weight", "0.3",
                              "--bcp_largest_cc", "0"])
    cfg = train_UGMCL_3D.config_from_args(args, "bcp")
    assert (cfg.method, cfg.exp, cfg.bcp_pretrain_iterations, cfg.bcp_u_weight, cfg.bcp_largest_cc) == (
        "bcp", "BraTs2019_BCP", 7, 0.3, 0)
    assert cfg.bcp_mask_ratio == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------------------------
# both stages through the shared loop, with a resume in stage 2
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("brats_bcp")
    write_synthetic_h5_dataset(root, 7, (36, 36, 34), 4, n_val=1, n_test=1)
    return root


def test_both_stages_run_through_the_loop_and_resume_bit_identically(tiny_root: Path, tmp_path: Path):
    cfg = TrainConfig(
        root_path=str(tiny_root), exp="tiny", method="bcp", model="unet_3D", labeled_num=2, patch_size=(32, 32, 32),
        feature_scale=16, max_iterations=4, batch_size=2, labeled_bs=1, bcp_pretrain_iterations=2,
        val_interval=100, save_interval=100, num_workers=0, device="cpu", stride_xy=16, stride_z=16,
    )
    train(cfg, model_dir=tmp_path / "a", progress=False)
    train(cfg, model_dir=tmp_path / "b", progress=False, stop_after=3)
    train(replace(cfg, resume=True), model_dir=tmp_path / "b", progress=False)

    def latest(run: str) -> dict:
        return torch.load(tmp_path / run / "tiny_2" / "unet_3D" / "checkpoint_latest.pth", weights_only=True)

    a, b = latest("a"), latest("b")
    assert a["method"]["teacher_initialised"] and "pretrain_student" in a["method"]
    log = (tmp_path / "a" / "tiny_2" / "unet_3D" / "log.txt").read_text()
    assert "loss_dice" in log and "loss_mix1" in log  # both stages ran
    saved = torch.load(tmp_path / "a" / "tiny_2" / "unet_3D" / "unet_3D_pretrain_model.pth", weights_only=True)
    assert all(torch.equal(saved[k], a["method"]["pretrain_student"][k]) for k in saved)  # the stage-1 student
    for part in ("student", "teacher", "pretrain_student"):
        first = a[part] if part == "student" else a["method"][part]
        second = b[part] if part == "student" else b["method"][part]
        assert all(torch.equal(first[k], second[k]) for k in first), part
