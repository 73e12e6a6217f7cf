"""Supervised-only baseline (paper Table 4; SSL4MIS ``train_fully_supervised_3D``) and the baselines' shared helpers.

Only the labelled rows count; with ``uses_unlabeled = False`` the loop feeds batches of ``labeled_bs`` labelled
patches. With z the segmentation logits of the labelled rows, p = softmax(z), y the labels:

    L = 0.5 * (CE(z, y) + Dice_C(p, y)),   Dice_C = (1/C) sum_c Dice(p_c, 1[y = c])

``Dice_C`` is SSL4MIS's ``DiceLoss(C)`` (every class, background included, each pooled over the batch); the UA-MT /
UG-MCL / DTC code uses the foreground term ``Dice(p_1, 1[y = 1])`` alone (``dice="foreground"``), which for C > 2
classes is the mean over the foreground classes, (1/(C-1)) sum_{c >= 1} Dice(p_c, 1[y = c])
(``utils.losses.foreground_dice_loss``).

Shared helpers: :func:`supervised_terms`, :func:`consistency_rows` (which rows an unsupervised term covers),
:func:`check_consistency_rows`, :func:`consistency_ramp` (the weight ramp w(t)), :func:`floats_for_log` and the
mixin :class:`ConsistencyOptions` of the methods with an unsupervised term.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from methods.base import Batch, Method, Passes, Term
from networks.outputs import segmentation_logits
from utils.losses import ce_loss, foreground_dice_loss, multiclass_dice_loss
from utils.ramps import ConsistencyRamp

if TYPE_CHECKING:
    from engine.config import TrainConfig

__all__ = [
    "CONSISTENCY_ROWS",
    "ConsistencyOptions",
    "DiceMode",
    "Supervised",
    "check_consistency_rows",
    "consistency_ramp",
    "consistency_rows",
    "floats_for_log",
    "row_slice",
    "supervised_objective",
    "supervised_terms",
]

DiceMode = Literal["classes", "foreground"]
CONSISTENCY_ROWS: tuple[str, ...] = ("released", "all", "unlabeled")
"""Values of the ``consistency_rows`` option: ``"released"`` (the method's reference code), ``"all"`` (whole batch)
or ``"unlabeled"`` (rows ``labeled_bs:`` only)."""


def row_slice(batch: int, labeled_bs: int, rows: str) -> slice:
    """The rows an unsupervised term covers: ``"all"`` -> ``[0, B)``, ``"unlabeled"`` -> ``[labeled_bs, B)``.

    Raises:
        ValueError: for another value of ``rows``, ``labeled_bs`` outside [1, B], or no unlabelled row.
    """
    if not 1 <= labeled_bs <= batch:
        raise ValueError(f"labeled_bs must be in [1, {batch}] for a batch of {batch}, but found {labeled_bs}")
    if rows == "all":
        return slice(0, batch)
    if rows == "unlabeled":
        if labeled_bs == batch:
            raise ValueError(f"rows='unlabeled' needs unlabelled rows, but all {batch} rows of the batch are labelled")
        return slice(labeled_bs, batch)
    raise ValueError(f"rows must be 'all' or 'unlabeled', but found {rows!r}")


def consistency_rows(cfg: TrainConfig, released: str) -> str:
    """Resolve the ``consistency_rows`` option (``"released"`` -> the method's reference choice ``released``)."""
    return released if cfg.consistency_rows == "released" else cfg.consistency_rows


def consistency_ramp(cfg: TrainConfig) -> ConsistencyRamp:
    """The weight ramp w(t) of the options ``consistency``, ``consistency_rampup`` and ``consistency_interval``."""
    return ConsistencyRamp(cfg.consistency, cfg.consistency_rampup, cfg.consistency_interval)


def check_consistency_rows(cfg: TrainConfig) -> None:
    """Refuse a ``consistency_rows`` value that is not one of :data:`CONSISTENCY_ROWS`.

    Raises:
        ValueError: naming the option and the value found.
    """
    if cfg.consistency_rows not in CONSISTENCY_ROWS:
        raise ValueError(f"--consistency_rows must be one of {CONSISTENCY_ROWS}, got {cfg.consistency_rows!r}")


class ConsistencyOptions:
    """Mixin of the methods whose unsupervised term reads ``consistency_rows`` and the weight ramp options.

    List it before the :class:`~methods.base.Method` base. It refuses an unknown ``consistency_rows`` with the
    other options (:meth:`check_config`) and, at construction, resolves it and the ramp.

    Attributes:
        released_rows: R of the method's reference code, what ``"released"`` stands for (a class attribute).
        rows: R for this run, ``"all"`` or ``"unlabeled"`` (:func:`consistency_rows`).
        ramp: the weight ramp w(t) (:func:`consistency_ramp`).
    """

    released_rows = "unlabeled"

    def __init__(self, student: nn.Module, cfg: TrainConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(student, cfg, *args, **kwargs)  # type: ignore[call-arg]
        self.rows = consistency_rows(cfg, self.released_rows)
        self.ramp = consistency_ramp(cfg)

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        """The options of the method's base, then ``consistency_rows`` (:func:`check_consistency_rows`)."""
        super().check_config(cfg)  # type: ignore[misc]
        check_consistency_rows(cfg)


def supervised_terms(logits: Tensor, label: Tensor, dice: DiceMode = "classes") -> dict[str, Tensor]:
    """CE and Dice of labelled logits: ``loss_ce``, ``loss_dice`` and ``supervised_loss = 0.5 (CE + Dice)``.

    Args:
        logits: z of the labelled rows, (B_l, C, D, H, W); computed in float32.
        label: y, (B_l, D, H, W) integer.
        dice: ``"classes"`` (mean Dice over the C classes, SSL4MIS) or ``"foreground"`` (mean over the classes
            1 .. C-1; class 1 alone for C = 2, as UA-MT).
    Raises:
        ValueError: for mismatched shapes or an unknown ``dice``.
    """
    if dice not in ("classes", "foreground"):
        raise ValueError(f"dice must be 'classes' or 'foreground', but found {dice!r}")
    logits = logits.float()
    prob = torch.softmax(logits, dim=1)
    loss_ce = ce_loss(logits, label)
    if dice == "classes":
        loss_dice = multiclass_dice_loss(prob, label)
    else:
        loss_dice = foreground_dice_loss(prob, label)
    return {"loss_ce": loss_ce, "loss_dice": loss_dice, "supervised_loss": 0.5 * (loss_ce + loss_dice)}


def supervised_objective(logits: Tensor, label: Tensor, labeled_bs: int, dice: DiceMode = "classes") -> dict[str, Term]:
    """The supervised-only loss on the first ``labeled_bs`` rows (module docstring).

    Args:
        logits: z, (B, C, D, H, W).
        label: y, (B, D, H, W) int64; rows ``labeled_bs:`` are not read.
        labeled_bs: number of labelled rows at the start of the batch.
        dice: see :func:`supervised_terms`.
    Returns:
        ``loss`` (= ``supervised_loss``), ``supervised_loss``, ``loss_ce``, ``loss_dice``.
    Raises:
        ValueError: for an invalid shape, ``labeled_bs`` or ``dice``.
    """
    row_slice(logits.shape[0], labeled_bs, "all")  # checks labeled_bs
    terms: dict[str, Term] = dict(supervised_terms(logits[:labeled_bs], label[:labeled_bs], dice))
    terms["loss"] = terms["supervised_loss"]
    return terms


def floats_for_log(terms: dict[str, Term], names: tuple[str, ...]) -> dict[str, float]:
    """The named scalar terms as floats, read with a single device synchronisation."""
    present = [n for n in names if n in terms]
    tensors = [n for n in present if isinstance(terms[n], Tensor)]
    logs: dict[str, float] = {}
    if tensors:
        stacked = torch.stack([terms[n].detach().float().reshape(()) for n in tensors])  # type: ignore[union-attr]
        values = stacked.tolist()
        logs.update(zip(tensors, values))
    logs.update({n: float(terms[n]) for n in present if n not in logs})
    return {n: logs[n] for n in present}


class Supervised(Method):
    """Supervised-only training on the labelled patches (the lower bound of paper Table 4).

    Works with single-output networks (``unet_3D``, ``vnet``) and dual-task ones (``unet_3D_dt``, ``vnet_dt``: the
    segmentation logits are used, the distance output is ignored). Reads ``num_classes`` from the config.

    Args:
        student, cfg, passes, forward: as :class:`methods.base.Method`.
    Raises:
        ValueError: at the first step, if the network's output is not logits, ``(dis, logits)`` or deep
            supervision maps.
    """

    name = "supervised"
    uses_unlabeled = False

    def __init__(self, student: nn.Module, cfg: TrainConfig, passes: Passes | None = None,
                 forward: nn.Module | None = None) -> None:
        super().__init__(student, cfg, passes, forward)

    def training_step(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Student forward on the labelled rows only, then 0.5 (CE + Dice)."""
        lb = batch.labeled_bs
        logits = segmentation_logits(self.run_student(batch.image[:lb]), self.name)
        terms = supervised_objective(logits, batch.label[:lb], lb)
        logs = floats_for_log(terms, ("supervised_loss", "loss_ce", "loss_dice"))
        return terms["loss"], logs  # type: ignore[return-value]
