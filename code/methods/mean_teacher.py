"""Mean Teacher (Tarvainen & Valpola 2017) as in SSL4MIS ``train_mean_teacher_3D`` (paper Table 4).

An EMA teacher of the student (``utils.ema``) sees the input plus clipped Gaussian noise and stays in train mode
(dropout on), as released. With z the student's logits, q = softmax of the teacher's logits on
x + clamp(sigma N(0, 1), -c, c), and R the consistency rows:

    L = 0.5 * (CE(z_l, y) + Dice_C(softmax(z_l), y)) + w(t) * mean_R((softmax(z) - q)^2)
    w(t) = consistency * sigmoid_rampup(t // consistency_interval, consistency_rampup)

R is the unlabelled rows in SSL4MIS (``consistency_rows="released"`` or ``"unlabeled"``); ``"all"`` uses the whole
batch, as UG-MCL does for its own consistency. The teacher runs on the rows of R only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from methods.base import Batch, EMATeacherMethod, Passes, Term
from methods.supervised import ConsistencyOptions, DiceMode, floats_for_log, row_slice, supervised_terms
from networks.outputs import segmentation_logits
from utils.losses import softmax_mse
from utils.ramps import ConsistencyRamp

if TYPE_CHECKING:
    from engine.config import TrainConfig

__all__ = ["MeanTeacher", "mean_teacher_objective"]

_RELEASED_ROWS = "unlabeled"


def mean_teacher_objective(
    student_logits: Tensor, teacher_logits: Tensor, label: Tensor, labeled_bs: int, step: int, *,
    rows: str = _RELEASED_ROWS, ramp: ConsistencyRamp = ConsistencyRamp(), dice: DiceMode = "classes",
) -> dict[str, Term]:
    """Every term of the Mean Teacher loss (module docstring).

    Args:
        student_logits: z, (B, C, D, H, W), with gradient.
        teacher_logits: the teacher's logits on the noisy rows R, (|R|, C, D, H, W).
        label: y, (B, D, H, W) int64; only rows ``:labeled_bs`` are read.
        labeled_bs: number of labelled rows at the start of the batch.
        step: the 0-based iteration t.
        rows: R, ``"unlabeled"`` (rows ``labeled_bs:``, SSL4MIS) or ``"all"``.
        ramp: the weight ramp w(t) (default: the released 0.1, 200, 150).
        dice: the Dice of the supervised part (``methods.supervised.supervised_terms``).
    Returns:
        tensors ``loss``, ``supervised_loss``, ``loss_ce``, ``loss_dice``, ``consistency_dist`` (the mean squared
        gap), ``consistency_loss`` (w times it); float ``consistency_weight``.
    Raises:
        ValueError: for mismatched shapes, an invalid ``labeled_bs`` or ``rows``.
    """
    sel = row_slice(student_logits.shape[0], labeled_bs, rows)
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    terms: dict[str, Term] = dict(supervised_terms(student_logits[:labeled_bs], label[:labeled_bs], dice))
    weight = ramp.weight(step)
    terms["consistency_weight"] = weight
    terms["consistency_dist"] = torch.mean(softmax_mse(student_logits[sel], teacher_logits))
    terms["consistency_loss"] = weight * terms["consistency_dist"]
    terms["loss"] = terms["supervised_loss"] + terms["consistency_loss"]
    return terms


class MeanTeacher(ConsistencyOptions, EMATeacherMethod):
    """Mean Teacher with the EMA teacher kept in train mode; hyper-parameters from ``engine.config.TrainConfig``.

    Reads ``consistency``, ``consistency_rampup``, ``consistency_interval``, ``ema_decay``, ``noise_std``,
    ``noise_clip``, ``num_classes`` and the optional ``consistency_rows`` (default ``"released"``).
    The network returns logits (``unet_3D``, ``vnet``) or ``(dis, logits)`` (``unet_3D_dt``: the logits are used).

    Args:
        student: the network being trained.
        cfg: the training configuration.
        generator: optional RNG for the teacher's input noise (default: the global RNG).
    Raises:
        ValueError: for an invalid option; at the first step, for a network output of another form.
    """

    name = "mean_teacher"
    uses_unlabeled = True
    released_rows = _RELEASED_ROWS
    logged: tuple[str, ...] = ("supervised_loss", "loss_ce", "loss_dice", "consistency_dist", "consistency_loss",
                               "consistency_weight")

    def __init__(self, student: nn.Module, cfg: TrainConfig, passes: Passes | None = None,
                 forward: nn.Module | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__(student, cfg, passes, forward, generator)

    def training_step(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Student forward on the batch, one noisy teacher pass on the consistency rows, the objective."""
        self._prepare_teacher(batch.image)
        sel = row_slice(batch.image.shape[0], batch.labeled_bs, self.rows)
        student_logits = segmentation_logits(self.run_student(batch.image), self.name)
        with self.passes.around_teacher(), torch.no_grad():
            teacher_logits = segmentation_logits(self.teacher(self._noisy(batch.image[sel])), self.name)
        terms = mean_teacher_objective(
            student_logits, teacher_logits, batch.label, batch.labeled_bs, step, rows=self.rows, ramp=self.ramp
        )
        return terms["loss"], floats_for_log(terms, self.logged)  # type: ignore[return-value]
