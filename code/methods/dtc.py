"""DTC: dual-task consistency (Luo et al., AAAI 2021; HiLab-git/DTC ``train_la_dtc.py``), paper Table 4.

No teacher. A dual-task student ``(d, z) = f(x)`` predicts a signed distance map d (tanh output, negative inside)
and segmentation logits z with C >= 2 classes (labels y in {0 .. C-1}, 0 = background); the mask implied by d must
agree with p = softmax(z). On the labelled rows l, with sdf_gt the ground-truth SDF (``utils.sdf``, DTC
convention; channel c of a C-channel head is regressed to the SDF of ``label == c`` for every c = 0 .. C-1, a
one-channel head to the SDF of the whole foreground ``label > 0``):

    L_sup  = 0.5 * (CE(z_l, y) + Dice_fg(p_l, y)) + sdf_weight * mean((d_l - sdf_gt)^2)
    Dice_fg(p, y) = Dice(p[:, 1], 1[y = 1])                                   C = 2
                  = (1/(C-1)) sum_{c=1}^{C-1} Dice(p[:, c], 1[y = c])          C > 2 (``foreground_dice_loss``)
    L_dtc  = mean((sigmoid(-k d) - p)^2)          rows R (whole batch as released), all C channels, unmasked
    L      = L_sup + w(t) * L_dtc

A one-channel head's L_dtc compares sigmoid(-k d) with the foreground probability ``sum_{c >= 1} p_c``
(``p[:, 1]`` for C = 2; ``utils.losses.cross_task_consistency``).

Differences from the released DTC, which is one-class with a sigmoid output: the segmentation here is a softmax
over C >= 2 classes (C = 2 by default), so that it runs with ``vnet_dt`` like UG-MCL's paper variant
(not with ``unet_3D_dt``, whose distance output is tanh of its logits: see :class:`DTC`), and the supervised part
adds the cross entropy (DTC computes it but leaves it out of its loss, ``Dice + 0.3 * L_sdf``). ``sdf_weight`` is
DTC's ``--beta`` (0.3); k = 1500 (``sdf_k``); the weight ramp is the shared one (``consistency``,
``consistency_rampup``, ``consistency_interval``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from methods.base import Batch, Method, Passes, Term
from methods.supervised import ConsistencyOptions, floats_for_log, row_slice
from methods.ugmcl import ground_truth_sdf
from networks.unet_3D import unet_3D_dt
from utils.losses import ce_loss, cross_task_consistency, foreground_dice_loss, sdf_regression_loss, sdf_to_mask
from utils.ramps import ConsistencyRamp

if TYPE_CHECKING:
    from engine.config import TrainConfig

__all__ = ["DTC", "dtc_objective"]

_RELEASED_ROWS = "all"


def _check_dual(dis: Tensor, logits: Tensor) -> None:
    if logits.dim() < 3 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (B, C, D, H, W) with C >= 2 classes, but found {tuple(logits.shape)}")
    classes = logits.shape[1]
    if (
        dis.dim() != logits.dim()
        or dis.shape[0] != logits.shape[0]
        or dis.shape[2:] != logits.shape[2:]
        or dis.shape[1] not in (1, classes)
    ):
        raise ValueError(
            f"dis {tuple(dis.shape)} must be (B, 1 or {classes}, D, H, W) like logits {tuple(logits.shape)}"
        )


def dtc_objective(
    dis: Tensor,
    logits: Tensor,
    label: Tensor,
    labeled_bs: int,
    step: int,
    *,
    rows: str = _RELEASED_ROWS,
    sdf_weight: float = 0.3,
    sdf_k: float = 1500.0,
    ramp: ConsistencyRamp = ConsistencyRamp(),
    gt_sdf: Tensor | None = None,
) -> dict[str, Term]:
    """Every term of the DTC loss (module docstring).

    Args:
        dis: d, (B, C, D, H, W) or (B, 1, D, H, W), with gradient.
        logits: z, (B, C, D, H, W) with C >= 2 classes, with gradient.
        label: y, (B, D, H, W) int64 in {0 .. C-1}; only rows ``:labeled_bs`` are read.
        labeled_bs: number of labelled rows at the start of the batch.
        step: the 0-based iteration t.
        rows: R of the dual-task consistency, ``"all"`` (released) or ``"unlabeled"``.
        sdf_weight: weight of the SDF regression (DTC's beta, 0.3).
        sdf_k: k in sigmoid(-k d) (1500).
        ramp: the weight ramp w(t) (default: the released 0.1, 200, 150).
        gt_sdf: ground-truth SDF of the labelled rows, shaped like ``dis[:labeled_bs]``; computed from ``label``
            when ``None``.
    Returns:
        tensors ``loss``, ``supervised_loss``, ``loss_ce``, ``loss_dice``, ``loss_sdf``, ``consistency_dist``
        (L_dtc), ``consistency_loss`` (w L_dtc); float ``consistency_weight``.
    Raises:
        ValueError: for mismatched shapes, an invalid ``labeled_bs`` or ``rows``.
    """
    _check_dual(dis, logits)
    sel = row_slice(logits.shape[0], labeled_bs, rows)
    dis, logits = dis.float(), logits.float()
    lb = labeled_bs
    if gt_sdf is None:
        gt_sdf = ground_truth_sdf(label[:lb], dis.shape[1])
    terms: dict[str, Term] = {}
    terms["loss_ce"] = ce_loss(logits[:lb], label[:lb])
    terms["loss_dice"] = foreground_dice_loss(torch.softmax(logits[:lb], dim=1), label[:lb])
    terms["loss_sdf"] = sdf_regression_loss(dis[:lb], gt_sdf)
    terms["supervised_loss"] = 0.5 * (terms["loss_ce"] + terms["loss_dice"]) + sdf_weight * terms["loss_sdf"]
    weight = ramp.weight(step)
    terms["consistency_weight"] = weight
    terms["consistency_dist"] = cross_task_consistency(dis[sel], logits[sel], sdf_k)
    terms["consistency_loss"] = weight * terms["consistency_dist"]
    terms["loss"] = terms["supervised_loss"] + terms["consistency_loss"]
    return terms


class DTC(ConsistencyOptions, Method):
    """Dual-task consistency; hyper-parameters from ``engine.config.TrainConfig``.

    Reads ``consistency``, ``consistency_rampup``, ``consistency_interval``, ``sdf_k``, ``num_classes`` (C >= 2),
    and the optional ``dtc_sdf_weight`` (default 0.3) and ``consistency_rows`` (default ``"released"``).

    Args:
        student: dual-task network returning ``(dis, logits)`` with a separate SDF head (``vnet_dt``).
            ``unet_3D_dt`` is refused: its distance output is tanh of its logits, so regressing it to the SDF
            (negative inside class c) would push z_c down where the cross entropy pushes it up.
        cfg: the training configuration.
    Raises:
        ValueError: for an invalid option or a ``unet_3D_dt`` student; at the first step, if the network does not
            return ``(dis, logits)``.
    """

    name = "dtc"
    uses_unlabeled = True
    logged = ("supervised_loss", "loss_ce", "loss_dice", "loss_sdf", "consistency_dist", "consistency_loss",
              "consistency_weight")

    released_rows = _RELEASED_ROWS
    default_model = "vnet_dt"

    def __init__(self, student: nn.Module, cfg: TrainConfig, passes: Passes | None = None,
                 forward: nn.Module | None = None) -> None:
        super().__init__(student, cfg, passes, forward)
        if isinstance(student, unet_3D_dt):
            # Its "distance" output is tanh(z): regressing it to the SDF (negative inside class c) pushes z_c down
            # where the cross entropy pushes it up, so the two supervised terms would fight.
            raise ValueError(
                "--method dtc needs a network with a separate SDF head such as --model vnet_dt; unet_3D_dt's distance "
                "output is tanh of its own logits, which the SDF regression would drive against the segmentation"
            )
        self.sdf_weight = cfg.dtc_sdf_weight
        self._last_dis_mask: Tensor | None = None

    def training_step(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Student forward on the whole batch, ground-truth SDF of the labelled rows, the objective."""
        cfg = self.cfg
        output = self.run_student(batch.image)
        if not (isinstance(output, (tuple, list)) and len(output) == 2 and all(isinstance(o, Tensor) for o in output)):
            found = f"a {type(output).__name__} of length {len(output)}" if isinstance(output, (tuple, list)) else (
                type(output).__name__
            )
            raise ValueError(
                "--method dtc needs a dual-task --model returning (dis, logits) with a separate SDF head, such as "
                f"vnet_dt; the network returned {found}"
            )
        dis, logits = output
        terms = dtc_objective(
            dis, logits, batch.label, batch.labeled_bs, step,
            rows=self.rows, sdf_weight=self.sdf_weight, sdf_k=cfg.sdf_k, ramp=self.ramp,
        )
        # the union of the foreground classes: the smallest foreground distance (channel 1 alone for C = 2)
        foreground = dis[0, 1:] if dis.shape[1] > 1 else dis[0]
        self._last_dis_mask = sdf_to_mask(foreground.detach().float().amin(dim=0), cfg.sdf_k)
        return terms["loss"], floats_for_log(terms, self.logged)  # type: ignore[return-value]

    def images_to_log(self) -> dict[str, Tensor]:
        """The last step's foreground mask implied by the SDF, sigmoid(-k min_{c >= 1} d_c), of sample 0, (D, H, W)."""
        return {} if self._last_dis_mask is None else {"dis_to_mask": self._last_dis_mask}
