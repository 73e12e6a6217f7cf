"""URPC: uncertainty-rectified pyramid consistency (Luo et al., MICCAI 2021), as in SSL4MIS
``train_uncertainty_rectified_pyramid_consistency_3D`` (paper Table 4).

No teacher. A deep-supervision student (``unet_3D_ds``) returns K = 4 full-resolution logits maps z_1 .. z_K,
finest decoder level first, each with its own dropout perturbation. With p_k = softmax(z_k), the labelled rows l
and the consistency rows R (the unlabelled rows as released):

    L_sup  = (1/K) sum_k 0.5 * (CE(z_k,l, y) + Dice_C(p_k,l, y))          (SSL4MIS: the 8 terms / 8)
    p_bar  = (1/K) sum_k p_k
    U_k    = sum_c p_bar_c (log p_bar_c - log p_k,c)                      KL(p_bar || p_k), (B, 1, D, H, W)
    L_k    = mean((p_bar - p_k)^2 exp(-U_k)) / (mean(exp(-U_k)) + 1e-8) + mean(U_k)      on the rows R
    L      = L_sup + w(t) * (1/K) sum_k L_k

Gradients flow through p_bar and U_k as released (nothing is detached). ``log p_k`` is computed as
``log_softmax(z_k)`` (the release takes ``log(softmax(z_k))``: the same value, without the underflow to -inf).

Validation and testing use the first output z_1 (the finest level), as SSL4MIS's URPC test does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from methods.base import Batch, Method, Passes, Term
from methods.supervised import ConsistencyOptions, DiceMode, floats_for_log, row_slice, supervised_terms
from networks.outputs import same_shaped_maps
from utils.losses import kl_divergence_map, uncertainty_rectified_consistency
from utils.ramps import ConsistencyRamp

if TYPE_CHECKING:
    from engine.config import TrainConfig

__all__ = ["URPC", "urpc_objective"]

_RELEASED_ROWS = "unlabeled"
_MIN_LEVELS = 3  # a two-element output is a dual-task (dis, logits) network, not a pyramid


def _pyramid(output: Any) -> list[Tensor]:
    """The K logits maps of a deep-supervision output, or a one-line error naming --model."""
    return same_shaped_maps(output, _MIN_LEVELS, "urpc", f"a deep-supervision --model returning {_MIN_LEVELS} or more same-shaped logits maps, such as unet_3D_ds")


def urpc_objective(
    level_logits: Sequence[Tensor], label: Tensor, labeled_bs: int, step: int, *, rows: str = _RELEASED_ROWS,
    ramp: ConsistencyRamp = ConsistencyRamp(), dice: DiceMode = "classes",
) -> dict[str, Term]:
    """Every term of the URPC loss (module docstring).

    Args:
        level_logits: z_1 .. z_K, each (B, C, D, H, W), with gradient; K >= 1.
        label: y, (B, D, H, W) int64; only rows ``:labeled_bs`` are read.
        labeled_bs: number of labelled rows at the start of the batch.
        step: the 0-based iteration t.
        rows: R, ``"unlabeled"`` (released) or ``"all"``.
        ramp: the weight ramp w(t) (default: the released 0.1, 200, 150).
        dice: the Dice of the supervised part (``methods.supervised.supervised_terms``).
    Returns:
        tensors ``loss``, ``supervised_loss`` (L_sup), ``loss_ce`` and ``loss_dice`` (each averaged over the levels),
        ``uncertainty`` (|R|, 1, D, H, W) (the mean of U_k over the levels), ``uncertainty_mean`` (its mean),
        ``consistency_dist`` ((1/K) sum_k L_k), ``consistency_loss`` (w times it); float ``consistency_weight``.
    Raises:
        ValueError: for no level, levels of different shapes, an invalid ``labeled_bs`` or ``rows``.
    """
    if len(level_logits) == 0:
        raise ValueError("level_logits must hold at least one logits map")
    shape = level_logits[0].shape
    if any(z.shape != shape for z in level_logits):
        raise ValueError(f"every level must have the same shape, found {[tuple(z.shape) for z in level_logits]}")
    sel = row_slice(shape[0], labeled_bs, rows)
    levels = [z.float() for z in level_logits]
    n = len(levels)
    lb = labeled_bs

    per_level = [supervised_terms(z[:lb], label[:lb], dice) for z in levels]
    terms: dict[str, Term] = {
        "loss_ce": sum(t["loss_ce"] for t in per_level) / n,
        "loss_dice": sum(t["loss_dice"] for t in per_level) / n,
    }
    terms["supervised_loss"] = sum(t["supervised_loss"] for t in per_level) / n

    probs = [torch.softmax(z, dim=1) for z in levels]
    mean_prob = (sum(probs) / n)[sel]  # type: ignore[index]
    uncertainties = [kl_divergence_map(mean_prob, torch.log_softmax(z[sel], dim=1)) for z in levels]
    level_losses = [uncertainty_rectified_consistency(p[sel], mean_prob, u) for p, u in zip(probs, uncertainties)]
    weight = ramp.weight(step)
    terms["consistency_weight"] = weight
    terms["uncertainty"] = (sum(uncertainties) / n).detach()  # type: ignore[union-attr]
    terms["uncertainty_mean"] = terms["uncertainty"].mean()
    terms["consistency_dist"] = sum(level_losses) / n
    terms["consistency_loss"] = weight * terms["consistency_dist"]
    terms["loss"] = terms["supervised_loss"] + terms["consistency_loss"]
    return terms


class URPC(ConsistencyOptions, Method):
    """URPC; reads ``consistency``, ``consistency_rampup``, ``consistency_interval``, ``num_classes`` and the optional
    ``consistency_rows`` (default ``"released"``).

    Args:
        student: deep-supervision network returning K >= 3 same-shaped logits maps (``unet_3D_ds``).
        cfg: the training configuration.
    Raises:
        ValueError: for an invalid option; at the first step, for a network output of another form.
    """

    name = "urpc"
    uses_unlabeled = True
    logged = ("supervised_loss", "loss_ce", "loss_dice", "consistency_dist", "consistency_loss", "consistency_weight",
              "uncertainty_mean")

    released_rows = _RELEASED_ROWS
    default_model = "unet_3D_ds"

    def __init__(self, student: nn.Module, cfg: TrainConfig, passes: Passes | None = None,
                 forward: nn.Module | None = None) -> None:
        super().__init__(student, cfg, passes, forward)
        self._last_uncertainty: Tensor | None = None

    def training_step(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Student forward on the whole batch (all K levels), then the objective."""
        levels = _pyramid(self.run_student(batch.image))
        terms = urpc_objective(levels, batch.label, batch.labeled_bs, step, rows=self.rows, ramp=self.ramp)
        self._last_uncertainty = terms["uncertainty"][0, 0]  # type: ignore[index]
        return terms["loss"], floats_for_log(terms, self.logged)  # type: ignore[return-value]

    def images_to_log(self) -> dict[str, Tensor]:
        """The last step's pyramid uncertainty (mean KL over the levels) of the first consistency row, (D, H, W)."""
        return {} if self._last_uncertainty is None else {"uncertainty": self._last_uncertainty}
