"""Entropy minimisation (Vu et al., CVPR 2019) as in SSL4MIS ``train_entropy_minimization_3D`` (paper Table 4).

No teacher: the student is pushed towards confident predictions on the rows R. With p = softmax(z):

    L = 0.5 * (CE(z_l, y) + Dice_C(p_l, y)) + w(t) * mean_R(-sum_c p_c log(p_c + 1e-6) / ln C)

R is the whole batch in SSL4MIS (``consistency_rows="released"`` or ``"all"``); ``"unlabeled"`` keeps the
unlabelled rows only. The weight ramp w(t) is the one of Mean Teacher / UG-MCL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from methods.base import Batch, Method, Passes, Term
from methods.supervised import ConsistencyOptions, DiceMode, floats_for_log, row_slice, supervised_terms
from networks.outputs import segmentation_logits
from utils.losses import entropy_loss
from utils.ramps import ConsistencyRamp

if TYPE_CHECKING:
    from engine.config import TrainConfig

__all__ = ["EntropyMinimization", "entropy_min_objective"]

_RELEASED_ROWS = "all"


def entropy_min_objective(
    logits: Tensor, label: Tensor, labeled_bs: int, step: int, *, rows: str = _RELEASED_ROWS,
    ramp: ConsistencyRamp = ConsistencyRamp(), dice: DiceMode = "classes",
) -> dict[str, Term]:
    """Every term of the entropy-minimisation loss (module docstring).

    Args:
        logits: z, (B, C, D, H, W), with gradient.
        label: y, (B, D, H, W) int64; only rows ``:labeled_bs`` are read.
        labeled_bs: number of labelled rows at the start of the batch.
        step: the 0-based iteration t.
        rows: R, ``"all"`` (SSL4MIS) or ``"unlabeled"``.
        ramp: the weight ramp w(t) (default: the released 0.1, 200, 150).
        dice: the Dice of the supervised part (``methods.supervised.supervised_terms``).
    Returns:
        tensors ``loss``, ``supervised_loss``, ``loss_ce``, ``loss_dice``, ``entropy`` (the normalised mean
        entropy), ``entropy_loss`` (w times it); float ``consistency_weight``.
    Raises:
        ValueError: for an invalid shape, ``labeled_bs`` or ``rows``.
    """
    sel = row_slice(logits.shape[0], labeled_bs, rows)
    logits = logits.float()
    terms: dict[str, Term] = dict(supervised_terms(logits[:labeled_bs], label[:labeled_bs], dice))
    weight = ramp.weight(step)
    terms["consistency_weight"] = weight
    terms["entropy"] = entropy_loss(torch.softmax(logits[sel], dim=1))
    terms["entropy_loss"] = weight * terms["entropy"]
    terms["loss"] = terms["supervised_loss"] + terms["entropy_loss"]
    return terms


class EntropyMinimization(ConsistencyOptions, Method):
    """Entropy minimisation; reads ``consistency``, ``consistency_rampup``, ``consistency_interval``,
    ``num_classes`` and the optional ``consistency_rows`` (default ``"released"``).

    Args:
        student: logits or ``(dis, logits)`` network (``unet_3D``, ``vnet``, ``unet_3D_dt``).
        cfg: the training configuration.
    Raises:
        ValueError: for an invalid option; at the first step, for a network output of another form.
    """

    name = "entropy_min"
    uses_unlabeled = True
    released_rows = _RELEASED_ROWS
    logged = ("supervised_loss", "loss_ce", "loss_dice", "entropy", "entropy_loss", "consistency_weight")

    def __init__(self, student: nn.Module, cfg: TrainConfig, passes: Passes | None = None,
                 forward: nn.Module | None = None) -> None:
        super().__init__(student, cfg, passes, forward)

    def training_step(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Student forward on the whole batch, then the objective."""
        logits = segmentation_logits(self.run_student(batch.image), self.name)
        terms = entropy_min_objective(logits, batch.label, batch.labeled_bs, step, rows=self.rows, ramp=self.ramp)
        return terms["loss"], floats_for_log(terms, self.logged)  # type: ignore[return-value]
