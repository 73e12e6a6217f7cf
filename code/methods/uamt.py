"""UA-MT: uncertainty-aware mean teacher (Yu et al., MICCAI 2019), as released and in SSL4MIS (paper Table 4).

Mean Teacher (``methods.mean_teacher``) whose consistency keeps only the voxels where the teacher is confident.
On the consistency rows R (the unlabelled rows as released), with q the teacher's softmax on one noisy pass and
U the entropy of its mean softmax over T noisy dropout passes (``utils.uncertainty``):

    tau(t)  = (start + (end - start) * sigmoid_rampup(t, threshold_rampup)) * ln C,   M = 1[U < tau(t)]
    L_cons  = sum(M (softmax(z_R) - q)^2) / (C sum(M) + 1e-16)          (released: "2 * sum(M)", C = 2)
    L       = 0.5 * (CE(z_l, y) + Dice_C(softmax(z_l), y)) + w(t) * L_cons

Released: start 0.75, end 1.0, threshold_rampup = max_iterations, T = 8 passes run two at a time
(``mc_chunk = 2``), noise clamp(0.1 N(0, 1), -0.2, 0.2); the weight ramp is that of Mean Teacher.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from methods.base import Batch, Passes, Term
from methods.mean_teacher import MeanTeacher
from methods.supervised import DiceMode, floats_for_log, row_slice, supervised_terms
from networks.outputs import segmentation_logits
from utils.losses import masked_consistency, softmax_mse
from utils.ramps import ConsistencyRamp
from utils.uncertainty import mc_dropout_uncertainty, uncertainty_threshold

if TYPE_CHECKING:
    from engine.config import TrainConfig

__all__ = ["UAMT", "uamt_objective"]


def uamt_objective(
    student_logits: Tensor,
    teacher_logits: Tensor,
    uncertainty: Tensor,
    label: Tensor,
    labeled_bs: int,
    step: int,
    *,
    threshold_rampup: float,
    rows: str = "unlabeled",
    ramp: ConsistencyRamp = ConsistencyRamp(),
    threshold_start: float = 0.75,
    threshold_end: float = 1.0,
    dice: DiceMode = "classes",
) -> dict[str, Term]:
    """Every term of the UA-MT loss (module docstring).

    Args:
        student_logits: z, (B, C, D, H, W), with gradient.
        teacher_logits: the teacher's logits on one noisy pass over the rows R, (|R|, C, D, H, W).
        uncertainty: U on the rows R, (|R|, 1, D, H, W).
        label: y, (B, D, H, W) int64; only rows ``:labeled_bs`` are read.
        labeled_bs: number of labelled rows at the start of the batch.
        step: the 0-based iteration t.
        threshold_rampup: L of the threshold ramp (``max_iterations`` as released).
        rows: R, ``"unlabeled"`` (released) or ``"all"``.
        ramp: the weight ramp w(t) (default: the released 0.1, 200, 150).
        threshold_start, threshold_end: tau / ln C at the start and the end of its ramp (0.75, 1.0).
        dice: the Dice of the supervised part (``methods.supervised.supervised_terms``).
    Returns:
        tensors ``loss``, ``supervised_loss``, ``loss_ce``, ``loss_dice``, ``mask`` (|R|, 1, D, H, W) float,
        ``consistency_dist`` (L_cons), ``consistency_loss`` (w L_cons); floats ``consistency_weight``, ``threshold``.
    Raises:
        ValueError: for mismatched shapes, an invalid ``labeled_bs`` or ``rows``.
    """
    sel = row_slice(student_logits.shape[0], labeled_bs, rows)
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    terms: dict[str, Term] = dict(supervised_terms(student_logits[:labeled_bs], label[:labeled_bs], dice))
    weight = ramp.weight(step)
    threshold = uncertainty_threshold(step, threshold_rampup, threshold_start, threshold_end, student_logits.shape[1])
    mask = (uncertainty < threshold).float()
    terms["consistency_weight"] = weight
    terms["threshold"] = threshold
    terms["mask"] = mask
    terms["consistency_dist"] = masked_consistency(softmax_mse(student_logits[sel], teacher_logits), mask)
    terms["consistency_loss"] = weight * terms["consistency_dist"]
    terms["loss"] = terms["supervised_loss"] + terms["consistency_loss"]
    return terms


class UAMT(MeanTeacher):
    """UA-MT; hyper-parameters from ``engine.config.TrainConfig``.

    Reads what :class:`~methods.mean_teacher.MeanTeacher` reads, plus ``mc_passes`` (T), ``mc_chunk``,
    ``threshold_start``, ``threshold_end`` and ``threshold_rampup`` (``None``: ``max_iterations``).

    Args:
        student: logits or ``(dis, logits)`` network (``unet_3D``, ``vnet``, ``unet_3D_dt``).
        cfg: the training configuration.
        generator: optional RNG for all the teacher's input noise (default: the global RNG).
    Raises:
        ValueError: for an invalid option; at the first step, for a network output of another form.
    """

    name = "uamt"
    logged = MeanTeacher.logged + ("threshold", "mask_ratio", "uncertainty_mean")

    def __init__(self, student: nn.Module, cfg: TrainConfig, passes: Passes | None = None,
                 forward: nn.Module | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__(student, cfg, passes, forward, generator)
        self.threshold_rampup = cfg.max_iterations if cfg.threshold_rampup is None else cfg.threshold_rampup
        self._last_uncertainty: Tensor | None = None

    def training_step(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Student forward, one noisy teacher pass (target) and T noisy passes (uncertainty) on the rows R."""
        cfg = self.cfg
        self._prepare_teacher(batch.image)
        sel = row_slice(batch.image.shape[0], batch.labeled_bs, self.rows)
        student_logits = segmentation_logits(self.run_student(batch.image), self.name)
        with self.passes.around_teacher():
            with torch.no_grad():
                teacher_logits = segmentation_logits(self.teacher(self._noisy(batch.image[sel])), self.name)
            uncertainty, _ = mc_dropout_uncertainty(
                self.teacher,
                batch.image[sel],
                passes=cfg.mc_passes,
                noise_std=cfg.noise_std,
                noise_clip=cfg.noise_clip,
                chunk=cfg.mc_chunk,
                generator=self.generator,
                logits_fn=lambda output: segmentation_logits(output, self.name),
            )
        terms = uamt_objective(
            student_logits, teacher_logits, uncertainty, batch.label, batch.labeled_bs, step,
            threshold_rampup=self.threshold_rampup, rows=self.rows, ramp=self.ramp,
            threshold_start=cfg.threshold_start, threshold_end=cfg.threshold_end,
        )
        self._last_uncertainty = uncertainty[0, 0].detach()
        terms["mask_ratio"] = terms["mask"].mean()  # type: ignore[union-attr]
        terms["uncertainty_mean"] = uncertainty.mean()
        return terms["loss"], floats_for_log(terms, self.logged)  # type: ignore[return-value]

    def images_to_log(self) -> dict[str, Tensor]:
        """The last step's uncertainty U of the first consistency row, (D, H, W)."""
        return {} if self._last_uncertainty is None else {"uncertainty": self._last_uncertainty}
