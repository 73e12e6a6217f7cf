"""MC-Net+: mutual consistency learning (Wu et al., Medical Image Analysis 81, 102530, 2022; ycwu1997/MC-Net
``code/train_mcnet_3d.py`` with ``--model mcnet3d_v2``).

No teacher. One student with a shared encoder and K = 3 decoders (``mcnet3d_v2``, ``networks/mcnet.py``) gives
logits z_1 .. z_K, each (B, C, D, H, W) with C >= 2. With p_k = softmax(z_k), the labelled rows l, the consistency
rows R (the whole batch as released) and the temperature T:

    L_sup = sum_k 0.5 * (CE(z_k,l, y) + Dice_fg(p_k,l, y))                  summed over the K decoders
    s_k   = sharpen(p_k, T) = p_k^(1/T) / sum_c p_k,c^(1/T)                  soft pseudo-label, no gradient
    L_mc  = sum_{i != j} mean_R((p_i - s_j)^2)                                the K (K - 1) = 6 ordered pairs, summed
    L     = L_sup + w(t) * L_mc,     w(t) = consistency * sigmoid_rampup(t // consistency_interval, consistency_rampup)

``Dice_fg`` is the foreground Dice of UA-MT / DTC (``utils.losses.foreground_dice_loss``: class 1 for C = 2, the
mean over the classes 1 .. C-1 otherwise), as the release's ``Binary_dice_loss(p[:, 1], y == 1)``. Each mean runs over
every element (rows R, C channels, voxels). An empty foreground follows ``foreground_dice_loss``'s rule.

Published settings (ycwu1997/MC-Net ``code/train_mcnet_3d.py`` and ``train_mcnet_3d.sh``, the MC-Net+ runs on LA and
Pancreas-CT): ``--temperature 0.1``, ``--consistency 1`` (the final weight of the summed L_mc),
``--consistency_rampup 40`` advanced every 150 iterations (``iter_num // 150``; 40 "epochs" of 150 iterations =
6,000 iterations) and ``--lamda 0.5``. ``code/train_mcnet_plus_3D.py`` sets ``--consistency 1
--consistency_rampup 40``; ``train_UGMCL_3D.py --method mcnet_plus`` keeps the shared defaults (0.1, 200, 150) unless
they are given. The temperature is :attr:`MCNetPlus.temperature` (0.1). Uncertain: a final weight of 0.1 with L_mc
averaged over the pairs has been quoted for the paper; its text was not at hand to check, and the released code
(above) sums the pairs with weight 1. That weighting would be ``--consistency 0.1 / 6`` (about 0.0167) here, since
the mean over the 6 pairs is L_mc / 6.

Differences from the released code, each kept small and named:

* the supervised part adds the cross entropy: the release computes ``F.cross_entropy`` per decoder but trains on
  ``0.5 * sum_k Dice_k`` alone (the CE is only logged); here, as for every baseline, 0.5 (CE + Dice) per decoder;
* its Dice is ``1 - (2 sum(p t) + 1e-8) / (sum(p) + sum(t) + 1e-8)`` (first powers); here the project's Dice
  (squares, smooth 1e-5, ``utils.losses.dice_loss``);
* its pseudo-labels keep their gradient (the consistency back-propagates through s_j as well); here they are
  computed without gradient, as a pseudo-label is;
* its sharpening is ``p^(1/T) / (p^(1/T) + (1 - p)^(1/T))`` per channel, the same as :func:`sharpen` for C = 2
  (p_0 = 1 - p_1) but not a distribution over C > 2 classes; :func:`sharpen` normalises over the classes;
* its ramp reads ``iter_num // 150`` after ``iter_num += 1``, one iteration ahead of ``step // 150`` here.

Rows: the release computes L_mc on every row of the batch, labelled ones included (``consistency_rows="released"``
= ``"all"``); ``"unlabeled"`` uses rows ``labeled_bs:`` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from methods.base import Batch, Method, Passes, Term
from methods.supervised import ConsistencyOptions, DiceMode, floats_for_log, row_slice, supervised_terms
from networks.outputs import same_shaped_maps
from utils.ramps import ConsistencyRamp

if TYPE_CHECKING:
    from engine.config import TrainConfig

__all__ = ["MCNetPlus", "PUBLISHED_RAMP", "mcnet_plus_objective", "mutual_consistency", "sharpen"]

_RELEASED_ROWS = "all"
_MIN_DECODERS = 3  # a two-element output is a dual-task (dis, logits) network, not two decoders
PUBLISHED_RAMP = ConsistencyRamp(consistency=1.0, rampup=40.0, interval=150)
"""w(t) of the release: ``--consistency 1``, ``--consistency_rampup 40``, ``iter_num // 150``."""


def sharpen(prob: Tensor, temperature: float = 0.1) -> Tensor:
    """Sharpened probabilities, MC-Net+'s soft pseudo-label.

        s_c = p_c^(1/T) / sum_c' p_c'^(1/T)            over the class axis (dim 1)

    Computed as ``softmax(log(p) / T)``: the same value, without the underflow of p^(1/T) to 0 / 0 for a small T.
    T = 1 returns p; T -> 0 tends to the one-hot argmax. A class of probability 0 stays 0.

    Args:
        prob: class probabilities p, (B, C, D, H, W), each voxel summing to 1.
        temperature: T > 0 (0.1 as released).
    Raises:
        ValueError: if ``temperature`` is not positive or ``prob`` has no class axis.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, but found {temperature!r}")
    if prob.dim() < 2:
        raise ValueError(f"prob must be (B, C, ...) with a class axis, but found {tuple(prob.shape)}")
    return torch.softmax(torch.log(prob) / temperature, dim=1)


def mutual_consistency(probs: Sequence[Tensor], pseudo_labels: Sequence[Tensor]) -> Tensor:
    """MC-Net+'s mutual consistency: each decoder's probabilities against every other decoder's pseudo-label.

        L = sum_{i != j} mean((p_i - s_j)^2)            the K (K - 1) ordered pairs, summed as released

    Args:
        probs: p_1 .. p_K, each (B, C, D, H, W), with gradient; K >= 2.
        pseudo_labels: s_1 .. s_K, shaped like ``probs`` (normally :func:`sharpen` of them, without gradient).
    Raises:
        ValueError: for fewer than two decoders, a different number of pseudo-labels, or different shapes.
    """
    if len(probs) < 2 or len(pseudo_labels) != len(probs):
        raise ValueError(f"need K >= 2 probabilities and as many pseudo-labels, but found {len(probs)} and "
                         f"{len(pseudo_labels)}")
    shapes = {tuple(t.shape) for t in (*probs, *pseudo_labels)}
    if len(shapes) != 1:
        raise ValueError(f"every probability map and pseudo-label must have the same shape, found {sorted(shapes)}")
    pairs = [(i, j) for i in range(len(probs)) for j in range(len(probs)) if i != j]
    return sum(torch.mean((probs[i] - pseudo_labels[j]) ** 2) for i, j in pairs)  # type: ignore[return-value]


def mcnet_plus_objective(
    decoder_logits: Sequence[Tensor], label: Tensor, labeled_bs: int, step: int, *, rows: str = _RELEASED_ROWS,
    ramp: ConsistencyRamp = PUBLISHED_RAMP, temperature: float = 0.1, dice: DiceMode = "foreground",
) -> dict[str, Term]:
    """Every term of the MC-Net+ loss (module docstring).

    Args:
        decoder_logits: z_1 .. z_K, each (B, C, D, H, W) with C >= 2, with gradient; K >= 2.
        label: y, (B, D, H, W) int64 in {0 .. C-1}; only rows ``:labeled_bs`` are read.
        labeled_bs: number of labelled rows at the start of the batch.
        step: the 0-based iteration t.
        rows: R, ``"all"`` (released) or ``"unlabeled"``.
        ramp: the weight ramp w(t) (default: the released 1, 40, 150, :data:`PUBLISHED_RAMP`).
        temperature: T of :func:`sharpen` (0.1 as released).
        dice: the Dice of the supervised part (``methods.supervised.supervised_terms``; ``"foreground"`` as
            released).
    Returns:
        tensors ``loss``, ``supervised_loss`` (L_sup), ``loss_ce`` and ``loss_dice`` (each summed over the decoders,
        as the release logs them), ``consistency_dist`` (L_mc), ``consistency_loss`` (w L_mc); float
        ``consistency_weight``.
    Raises:
        ValueError: for fewer than two decoders, decoders of different shapes, fewer than 2 classes, an invalid
            ``labeled_bs``, ``rows`` or ``temperature``.
    """
    if len(decoder_logits) < 2:
        raise ValueError(f"MC-Net+ needs K >= 2 decoders' logits, but found {len(decoder_logits)}")
    shape = decoder_logits[0].shape
    if any(z.shape != shape for z in decoder_logits):
        raise ValueError(f"every decoder must have the same shape, found {[tuple(z.shape) for z in decoder_logits]}")
    if len(shape) < 3 or shape[1] < 2:
        raise ValueError(f"logits must be (B, C, D, H, W) with C >= 2 classes, but found {tuple(shape)}")
    sel = row_slice(shape[0], labeled_bs, rows)
    decoders = [z.float() for z in decoder_logits]
    lb = labeled_bs

    per_decoder = [supervised_terms(z[:lb], label[:lb], dice) for z in decoders]
    terms: dict[str, Term] = {name: sum(t[name] for t in per_decoder) for name in ("loss_ce", "loss_dice")}
    terms["supervised_loss"] = sum(t["supervised_loss"] for t in per_decoder)

    probs = [torch.softmax(z[sel], dim=1) for z in decoders]
    with torch.no_grad():
        pseudo_labels = [sharpen(p, temperature) for p in probs]
    weight = ramp.weight(step)
    terms["consistency_weight"] = weight
    terms["consistency_dist"] = mutual_consistency(probs, pseudo_labels)
    terms["consistency_loss"] = weight * terms["consistency_dist"]
    terms["loss"] = terms["supervised_loss"] + terms["consistency_loss"]
    return terms


def _decoders(output: Any) -> list[Tensor]:
    """The K logits maps of a multi-decoder output, or a one-line error naming --model."""
    return same_shaped_maps(output, _MIN_DECODERS, "mcnet_plus", f"a multi-decoder --model returning {_MIN_DECODERS} or more same-shaped logits maps, such as mcnet3d_v2")


class MCNetPlus(ConsistencyOptions, Method):
    """MC-Net+; reads ``consistency``, ``consistency_rampup``, ``consistency_interval``, ``num_classes`` (C >= 2)
    and the optional ``consistency_rows`` (default ``"released"`` = ``"all"``).

    The published weight ramp (``--consistency 1 --consistency_rampup 40``) is the default of
    ``train_mcnet_plus_3D.py``; through ``train_UGMCL_3D.py --method mcnet_plus`` give it on the command line.

    Attributes:
        temperature: T of the sharpening, 0.1 (the release's ``--temperature 0.1``).

    Args:
        student: multi-decoder network returning K >= 3 same-shaped logits maps (``mcnet3d_v2``).
        cfg: the training configuration.
    Raises:
        ValueError: for an invalid option; at the first step, for a network output of another form.
    """

    name = "mcnet_plus"
    uses_unlabeled = True
    default_model = "mcnet3d_v2"
    released_rows = _RELEASED_ROWS
    temperature = 0.1
    logged = ("supervised_loss", "loss_ce", "loss_dice", "consistency_dist", "consistency_loss", "consistency_weight")

    def __init__(self, student: nn.Module, cfg: TrainConfig, passes: Passes | None = None,
                 forward: nn.Module | None = None) -> None:
        super().__init__(student, cfg, passes, forward)

    def training_step(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Student forward on the whole batch (all K decoders), then the objective."""
        decoders = _decoders(self.run_student(batch.image))
        terms = mcnet_plus_objective(decoders, batch.label, batch.labeled_bs, step, rows=self.rows, ramp=self.ramp,
                                     temperature=self.temperature)
        return terms["loss"], floats_for_log(terms, self.logged)  # type: ignore[return-value]
