"""BCP: bidirectional copy-paste (Bai et al., "Bidirectional Copy-Paste for Semi-Supervised Medical Image
Segmentation", CVPR 2023; DeepMed-Lab-ECNU/BCP ``code/LA_BCP_train.py`` and ``code/utils/BCP_utils.py``).

Two stages in one run; ``stage(t)`` is ``"pretrain"`` for t < ``bcp_pretrain_iterations`` (T_0), else
``"selftrain"``. M is a cuboid mask, 1 inside a random box of ``floor(r * side)`` voxels on each axis
(r = ``bcp_mask_ratio``), one per batch (:func:`cuboid_mask`); ``copy_paste(a, b, M) = M a + (1 - M) b``.

**1. Pre-training** (labelled rows only): the halves ``a = [0, s)`` and ``b = [s, 2s)`` of the labelled rows,
s = ``labeled_bs // 2`` (with one labelled row, a = b = that row, i.e. plain supervision)::

    X = M x_a + (1 - M) x_b,   Y = M y_a + (1 - M) y_b
    L_pre = 0.5 * (CE(z, Y) + Dice(softmax(z), Y)),   z = f(X)

**2. Self-training** with a mean teacher g, copied from the student at the first stage-2 step (so it starts
from the student at the end of stage 1) and then updated by EMA. Labelled row i is paired with unlabelled row i;
the pairs a = [0, s) and b = [s, 2s) (s = ``labeled_bs // 2``; with one pair, a = b = that pair) give::

    pl_u = argmax_c softmax(g(x_u))_c           (no gradient; largest component per class if bcp_largest_cc)
    X1 = M x_l^a + (1 - M) x_u^a,   Y1 = M y_l^a + (1 - M) pl_u^a      labelled inside the cuboid
    X2 = M x_u^b + (1 - M) x_l^b,   Y2 = M pl_u^b + (1 - M) y_l^b      unlabelled inside the cuboid
    L_self = mix_loss(f(X1), Y1, M, w_in=1, w_out=alpha) + mix_loss(f(X2), Y2, M, w_in=alpha, w_out=1)

so a voxel counts with weight 1 where it comes from a labelled image and alpha (``bcp_u_weight``) where it comes
from an unlabelled one. :func:`mix_loss` (BCP's ``mix_loss``) is, with regions R_in = M and R_out = 1 - M::

    mix_loss = 0.5 * (w_in (CE_Rin + Dice_Rin) + w_out (CE_Rout + Dice_Rout))
    CE_R   = sum_{b,v} R_v CE(z_bv, Y_bv) / (sum_{b,v} R_v + 1e-16)
    Dice_R = 1 - mean_{b,c} (2 sum_v R_v p_bcv t_bcv + s) / (sum_v R_v (p_bcv + t_bcv) + s),   s = 1e-5

``Dice`` is BCP's ``mask_DiceLoss``: per sample and per class, background included, ``p + t`` in the denominator
(not the ``p^2 + t^2`` of :func:`utils.losses.dice_loss`); a class absent from a region's target and prediction
scores 1, so an empty region adds 0 to the loss (also its CE).

Defaults, from the BCP repository (``LA_BCP_train.py`` argparse, ``utils/BCP_utils.py``, ``utils/losses.py``).
Sure of: ``pre_max_iteration`` 2000 (``bcp_pretrain_iterations``), ``self_max_iteration`` 15000 (so BCP's LA run
is ``--max_iterations 17000`` here; ours keeps the dataset's default), ``u_weight`` 0.5 (``bcp_u_weight``),
``mask_ratio`` 2/3 (``bcp_mask_ratio``), ``get_cut_mask(..., nms=1)`` (``bcp_largest_cc`` 1), EMA decay 0.99
(``ema_decay``, ours already), SGD lr 0.01, momentum 0.9, weight decay 1e-4, batch 8 with 4 labelled (ours: 4 / 2),
a V-Net on LA. From memory, less sure: the V-Net has batch norm and dropout (``net_factory(mode="train")``), and
the consistency weight the LA script computes is not used in its loss (``loss = loss_l + loss_u``).

Differences from the released code, each deliberate:

- Its ``context_mask`` returns the complement (0 inside the cuboid), so its ``mixl_img`` has the *labelled* image
  outside the box, the halves swapped relative to X1 / X2 here; the rows are exchangeable, so the two draw the
  same distribution of mixed images. Its offsets come from ``np.random.randint(0, 112 - size)`` with 112 / 80
  hard-coded (the last offset never drawn); here ``torch.randint(0, side - size + 1)`` on the patch's own sides,
  from the global torch RNG (saved in ``checkpoint_latest.pth``) or the method's generator (in :meth:`BCP.state_dict`).
- It starts stage 2 from the *best-validation* stage-1 weights (``<model>_best_model.pth`` of the pre-training
  folder), for both student and teacher, with a fresh optimiser and its iteration counter back at 0. Here stage 2
  continues from the last stage-1 weights with the same optimiser, and the learning-rate schedule and the EMA's
  ``min(1 - 1/(t + 1), decay)`` follow the global iteration t (with T_0 >= 99 the EMA weight is the constant
  0.99 of BCP's ``update_ema_variables``). The EMA here also copies buffers (BatchNorm statistics) from the
  student; BCP's leaves the teacher's own train-mode statistics.
- Its pseudo-label is ``softmax(g(x_u))[:, 1] >= 0.5`` (two classes); argmax here gives the same labels for C = 2
  except at exact ties, and extends to C >= 2 classes; the largest 26-connected component is kept per foreground
  class (BCP: of the foreground, with ``skimage.measure.label``; here ``scipy.ndimage.label``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.base import Batch, EMATeacherMethod, Passes, Term
from methods.supervised import floats_for_log
from networks.outputs import segmentation_logits
from utils.ema import update_ema
from utils.losses import ce_loss

if TYPE_CHECKING:
    from engine.config import TrainConfig

__all__ = [
    "BCP",
    "PRETRAIN",
    "SELFTRAIN",
    "bcp_dice_loss",
    "copy_paste",
    "cuboid_mask",
    "largest_component",
    "mix_loss",
    "mixed_target",
    "pretrain_objective",
    "pseudo_label",
    "selftrain_objective",
]

PRETRAIN = "pretrain"
SELFTRAIN = "selftrain"
_SMOOTH = 1e-5  # mask_DiceLoss's smooth


def cuboid_mask(shape: Sequence[int], fraction: float, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> Tensor:
    """A random box of ones: ``floor(fraction * side)`` voxels on each axis, uniformly placed (BCP's cuboid).

    The offset on each axis is drawn in axis order with ``torch.randint(0, side - size + 1)``, so every
    position (the last one too) can be drawn; ``fraction = 1`` gives the whole volume.

    Args:
        shape: the spatial shape, e.g. ``(D, H, W)``.
        fraction: side of the box / side of the volume, in (0, 1] (BCP's ``mask_ratio``, 2/3); a box side is at
            least 1 voxel.
        generator: the RNG of the offsets (default: the global torch RNG); the draws run on its device.
        device: where the mask is built (default: the CPU).
    Returns:
        bool tensor of ``shape``, True inside the box.
    Raises:
        ValueError: for an empty shape, a side < 1 or ``fraction`` outside (0, 1].
    """
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"shape must be non-empty with sides >= 1, but found {shape}")
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], but found {fraction!r}")
    # the epsilon keeps 96 * (2/3) at 64, not 63.999...
    sizes = [max(1, math.floor(side * fraction + 1e-9)) for side in shape]
    draw_device = generator.device if generator is not None else torch.device("cpu")
    starts = [int(torch.randint(0, side - size + 1, (1,), generator=generator, device=draw_device))
              for side, size in zip(shape, sizes)]
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    mask[tuple(slice(start, start + size) for start, size in zip(starts, sizes))] = True
    return mask


def _check_mask(mask: Tensor, spatial: Sequence[int], batch: int, name: str) -> None:
    spatial = tuple(spatial)
    if tuple(mask.shape) not in (spatial, (batch, *spatial)):
        raise ValueError(f"mask {tuple(mask.shape)} must be the spatial shape {spatial} or (B, *spatial) with "
                         f"B = {batch} of {name}")


def copy_paste(inside: Tensor, outside: Tensor, mask: Tensor) -> Tensor:
    """``M inside + (1 - M) outside``: ``inside`` where the mask is set, ``outside`` elsewhere (exact, any dtype).

    Args:
        inside: images (B, C, D, H, W) or labels (B, D, H, W): what fills the box.
        outside: the same shape: what surrounds it.
        mask: M, the spatial shape ``(D, H, W)`` (one box for every row, as BCP) or ``(B, D, H, W)``; bool or 0/1.
    Raises:
        ValueError: if the shapes differ or the mask does not fit.
    """
    if inside.shape != outside.shape:
        raise ValueError(f"inside {tuple(inside.shape)} and outside {tuple(outside.shape)} must have the same shape")
    if inside.dim() < 4:
        raise ValueError(f"inside must be (B, C, D, H, W) images or (B, D, H, W) labels, but found "
                         f"{tuple(inside.shape)}")
    _check_mask(mask, inside.shape[-3:], inside.shape[0], "the images")
    m = mask.bool()
    if m.dim() == 4 and inside.dim() == 5:  # a (B, D, H, W) mask over (B, C, D, H, W) images
        m = m.unsqueeze(1)
    return torch.where(m.to(inside.device), inside, outside)


def mixed_target(inside_label: Tensor, outside_label: Tensor, mask: Tensor) -> Tensor:
    """The label of a copy-pasted image: ``Y = M y_inside + (1 - M) y_outside``, int64.

    For X1 of the self-training ``inside_label`` is the labelled rows' ground truth and ``outside_label`` the
    teacher's pseudo-label of the unlabelled rows; for X2 the reverse.

    Args:
        inside_label: class indices (B, D, H, W).
        outside_label: class indices, same shape.
        mask: M, ``(D, H, W)`` or ``(B, D, H, W)``.
    Raises:
        ValueError: for labels that are not (B, D, H, W) alike, or a mask that does not fit.
    """
    if inside_label.dim() < 2:
        raise ValueError(f"labels must be (B, D, H, W), but found {tuple(inside_label.shape)}")
    if inside_label.is_floating_point() or outside_label.is_floating_point():
        raise ValueError(f"labels must be integer class indices, but found {inside_label.dtype} and "
                         f"{outside_label.dtype}")
    _check_mask(mask, inside_label.shape[1:], inside_label.shape[0], "the labels")
    return copy_paste(inside_label.long(), outside_label.long(), mask)


def bcp_dice_loss(prob: Tensor, target: Tensor, region: Tensor | None = None, smooth: float = _SMOOTH) -> Tensor:
    """BCP's ``mask_DiceLoss``: per sample and per class (background included), restricted to a region.

        L = 1 - mean_{b,c} (2 sum_v R_v p_bcv t_bcv + s) / (sum_v R_v (p_bcv + t_bcv) + s),   t_bc = 1[y_b = c]

    A (sample, class) with neither target nor prediction in the region scores 1 (adds 0); an empty region gives 0.

    Args:
        prob: p, (B, C, D, H, W) probabilities.
        target: y, (B, D, H, W) class indices in [0, C).
        region: R, ``(D, H, W)`` or ``(B, D, H, W)``, 1 where the voxel counts (default: everywhere).
        smooth: s (1e-5 as released).
    Raises:
        ValueError: if the shapes do not fit.
    """
    if prob.dim() < 3 or target.shape != prob.shape[:1] + prob.shape[2:]:
        raise ValueError(f"target must have the probabilities' shape without the class axis: prob "
                         f"{tuple(prob.shape)}, target {tuple(target.shape)}")
    one_hot = F.one_hot(target.long(), prob.shape[1]).movedim(-1, 1).to(prob.dtype)
    inter, union = prob * one_hot, prob + one_hot
    if region is not None:
        _check_mask(region, target.shape[1:], target.shape[0], "the target")
        weight = region.to(prob.dtype)
        weight = weight.unsqueeze(0) if weight.dim() == target.dim() - 1 else weight
        inter, union = inter * weight.unsqueeze(1), union * weight.unsqueeze(1)
    dims = tuple(range(2, prob.dim()))
    dice = (2 * inter.sum(dim=dims) + smooth) / (union.sum(dim=dims) + smooth)
    return 1 - dice.mean()


def _region_ce(logits: Tensor, target: Tensor, region: Tensor) -> Tensor:
    """sum R CE / (sum R + 1e-16) over every voxel of the batch (R broadcast over the rows)."""
    ce = F.cross_entropy(logits, target.long(), reduction="none")
    weight = region.to(ce.dtype).expand_as(ce)
    return (ce * weight).sum() / (weight.sum() + 1e-16)


def mix_loss(logits: Tensor, target: Tensor, mask: Tensor, inside_weight: float = 1.0,
             outside_weight: float = 0.5) -> Tensor:
    """BCP's ``mix_loss``: CE + Dice inside and outside the cuboid, each region weighted by its image's origin.

        L = 0.5 * (w_in (CE_M + Dice_M) + w_out (CE_{1-M} + Dice_{1-M}))

    with ``CE_R`` the mean cross entropy over the voxels of region R and ``Dice_R`` :func:`bcp_dice_loss` on R
    (module docstring). An empty region adds 0.

    Args:
        logits: z, (B, C, D, H, W), with gradient.
        target: Y, (B, D, H, W), the copy-pasted label (:func:`mixed_target`).
        mask: M, ``(D, H, W)`` or ``(B, D, H, W)``: the cuboid.
        inside_weight: w_in, the weight of the cuboid's voxels (1 if they come from a labelled image, else alpha).
        outside_weight: w_out, the weight of the voxels around it.
    Raises:
        ValueError: if the shapes do not fit.
    """
    if logits.dim() < 3 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target must have the logits' shape without the class axis: logits "
                         f"{tuple(logits.shape)}, target {tuple(target.shape)}")
    _check_mask(mask, target.shape[1:], target.shape[0], "the target")
    logits = logits.float()
    prob = torch.softmax(logits, dim=1)
    inside = mask.to(logits.device, torch.float32)
    outside = 1.0 - inside
    loss_in = _region_ce(logits, target, inside) + bcp_dice_loss(prob, target, inside)
    loss_out = _region_ce(logits, target, outside) + bcp_dice_loss(prob, target, outside)
    return 0.5 * (inside_weight * loss_in + outside_weight * loss_out)


def largest_component(label: Tensor, num_classes: int) -> Tensor:
    """Keep, in each row and for each foreground class, only its largest 26-connected component.

    The other components of a class become background (0); a class absent from a row stays absent. For two
    classes this is BCP's ``LargestCC_pancreas`` (ties: the component found first in raster order).

    Args:
        label: class indices (B, D, H, W), on any device (labelled on the CPU with ``scipy.ndimage.label``).
        num_classes: C.
    Returns:
        a tensor like ``label``.
    """
    from scipy import ndimage  # imported late: only the self-training with bcp_largest_cc needs it

    array = label.detach().cpu().numpy()
    out = np.zeros_like(array)
    structure = np.ones((3,) * (array.ndim - 1), dtype=bool)
    for row in range(array.shape[0]):
        for c in range(1, num_classes):
            components, count = ndimage.label(array[row] == c, structure=structure)
            if count == 0:
                continue
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            out[row][components == int(np.argmax(sizes))] = c
    return torch.from_numpy(out).to(label.device)


def pseudo_label(teacher_logits: Tensor, keep_largest: bool = False) -> Tensor:
    """The teacher's hard label ``argmax_c softmax(z_t)_c``, (B, D, H, W) int64; optionally :func:`largest_component`.

    Args:
        teacher_logits: z_t, (B, C, D, H, W), normally computed without gradient.
        keep_largest: keep only the largest component of each foreground class (BCP's ``nms=1``).
    """
    label = torch.argmax(teacher_logits.detach(), dim=1)
    return largest_component(label, teacher_logits.shape[1]) if keep_largest else label


def pretrain_objective(logits: Tensor, target: Tensor) -> dict[str, Term]:
    """Stage 1: ``0.5 * (CE(z, Y) + Dice(softmax(z), Y))`` on the copy-pasted labelled images (BCP ``pre_train``).

    Returns:
        tensors ``loss``, ``loss_ce`` (mean over every voxel) and ``loss_dice`` (:func:`bcp_dice_loss`).
    Raises:
        ValueError: if the shapes do not fit.
    """
    logits = logits.float()
    terms: dict[str, Term] = {"loss_ce": ce_loss(logits, target),
                              "loss_dice": bcp_dice_loss(torch.softmax(logits, dim=1), target)}
    terms["loss"] = 0.5 * (terms["loss_ce"] + terms["loss_dice"])
    return terms


def selftrain_objective(logits_1: Tensor, target_1: Tensor, logits_2: Tensor, target_2: Tensor, mask: Tensor,
                        u_weight: float = 0.5) -> dict[str, Term]:
    """Stage 2: ``mix_loss(z1, Y1, M, 1, alpha) + mix_loss(z2, Y2, M, alpha, 1)`` (module docstring).

    Args:
        logits_1: f(X1), X1 with the labelled image inside the cuboid, (B', C, D, H, W).
        target_1: Y1 = M y_l + (1 - M) pl_u, (B', D, H, W).
        logits_2: f(X2), X2 with the unlabelled image inside the cuboid.
        target_2: Y2 = M pl_u + (1 - M) y_l.
        mask: M, the cuboid, ``(D, H, W)``.
        u_weight: alpha, the weight of the voxels from the unlabelled images (BCP's ``u_weight``, 0.5).
    Returns:
        tensors ``loss``, ``loss_mix1``, ``loss_mix2``.
    """
    terms: dict[str, Term] = {
        "loss_mix1": mix_loss(logits_1, target_1, mask, inside_weight=1.0, outside_weight=u_weight),
        "loss_mix2": mix_loss(logits_2, target_2, mask, inside_weight=u_weight, outside_weight=1.0),
    }
    terms["loss"] = terms["loss_mix1"] + terms["loss_mix2"]
    return terms


def _halves(rows: int) -> tuple[slice, slice]:
    """BCP's ``a = [0, s)`` and ``b = [s, 2s)``, s = rows // 2; with one row both are that row."""
    if rows < 1:
        raise ValueError(f"BCP needs at least one labelled row, but the batch has {rows}")
    if rows == 1:
        return slice(0, 1), slice(0, 1)
    half = rows // 2
    return slice(0, half), slice(half, 2 * half)


class BCP(EMATeacherMethod):
    """Bidirectional copy-paste: supervised copy-paste pre-training, then mean-teacher self-training.

    Reads ``bcp_pretrain_iterations``, ``bcp_u_weight``, ``bcp_mask_ratio``, ``bcp_largest_cc``, ``ema_decay`` and
    ``num_classes`` (C >= 2). The network returns logits (``vnet``, ``unet_3D``) or ``(dis, logits)``
    (``unet_3D_dt``, ``vnet_dt``: the logits are used). ``--model`` defaults to ``vnet`` on the V-Net datasets
    (``la``, ``pancreas``, ``coranet``: BCP's network there) and to ``unet_3D_dt`` elsewhere, the backbone of the
    other BraTS baselines (its distance output is left unused).

    The teacher (built at construction, so a checkpoint always holds it) is set to the student at the first
    self-training step and updated by EMA after each self-training step only; the student at the end of stage 1 is
    kept (:meth:`pretrain_weights`) and saved in :meth:`state_dict`.

    Args:
        student, cfg, passes, forward: as :class:`methods.base.Method`.
        generator: optional RNG of the cuboids (default: the global torch RNG); its state is saved in
            :meth:`state_dict`.
    Raises:
        ValueError: for an invalid option, or a batch whose unlabelled rows are not as many as its labelled ones;
            at the first step, for a network output of another form.
    """

    name = "bcp"
    uses_unlabeled = True
    default_model = "unet_3D_dt"
    logged_pretrain = ("loss_ce", "loss_dice")
    logged_selftrain = ("loss_mix1", "loss_mix2", "pseudo_foreground")

    def __init__(self, student: nn.Module, cfg: TrainConfig, passes: Passes | None = None,
                 forward: nn.Module | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__(student, cfg, passes, forward, generator)
        self.teacher_initialised = False
        self._pretrain_weights: dict[str, Tensor] | None = None

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        """The ranges, then a batch of as many unlabelled as labelled rows (labelled row i is paired with
        unlabelled row i)."""
        super().check_config(cfg)
        if cfg.batch_size - cfg.labeled_bs != cfg.labeled_bs:
            raise ValueError(
                f"--method bcp pairs each labelled patch with one unlabelled patch, so --batch_size must be twice "
                f"--labeled_bs, but found --batch_size {cfg.batch_size} with --labeled_bs {cfg.labeled_bs} "
                f"(BCP on LA: --batch_size 8 --labeled_bs 4)"
            )

    @classmethod
    def model_for(cls, cfg: TrainConfig) -> str:
        """``vnet`` on the datasets whose papers train a V-Net (BCP's network on LA), else ``unet_3D_dt``."""
        from dataloaders.datasets import DATASETS

        layout = DATASETS.get(cfg.dataset)
        if layout is not None and layout.models.get(cls.default_model, "").startswith("vnet"):
            return "vnet"
        return cls.default_model

    def stage(self, step: int) -> str:
        """``"pretrain"`` for the 0-based iteration ``step`` < ``bcp_pretrain_iterations``, else ``"selftrain"``."""
        return PRETRAIN if step < self.cfg.bcp_pretrain_iterations else SELFTRAIN

    def pretrain_weights(self) -> dict[str, Tensor] | None:
        """The student at the end of stage 1 (a CPU ``state_dict``), once the self-training has started; else None."""
        return self._pretrain_weights

    def training_step(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """A copy-paste pre-training step or a bidirectional copy-paste self-training step, by :meth:`stage`."""
        if self.stage(step) == PRETRAIN:
            return self._pretrain_step(batch)
        return self._selftrain_step(batch)

    def after_optimizer_step(self, step: int) -> None:
        """EMA update of the teacher (``utils.ema.update_ema`` at the global ``step``), in the self-training only."""
        if self.stage(step) == SELFTRAIN:
            update_ema(self.teacher, self.student, step, self.cfg.ema_decay)

    # ------------------------------------------------------------------------------------------ the two steps
    def _mask(self, image: Tensor) -> Tensor:
        return cuboid_mask(image.shape[2:], self.cfg.bcp_mask_ratio, self.generator, device=image.device)

    def _logits(self, x: Tensor) -> Tensor:
        return segmentation_logits(self.run_student(x), self.name)

    def _pretrain_step(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        lb = batch.labeled_bs
        a, b = _halves(lb)
        image, label = batch.image[:lb], batch.label[:lb]
        mask = self._mask(image)  # drawn first, then the student's dropout
        mixed = copy_paste(image[a], image[b], mask)
        terms = pretrain_objective(self._logits(mixed), mixed_target(label[a], label[b], mask))
        return terms["loss"], floats_for_log(terms, self.logged_pretrain)  # type: ignore[return-value]

    def _start_selftrain(self) -> None:
        """At the first self-training step: keep the stage-1 student and copy it into the teacher."""
        self._pretrain_weights = {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher_initialised = True

    def _selftrain_step(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        lb, rows = batch.labeled_bs, batch.image.shape[0]
        if rows - lb != lb:
            raise ValueError(f"--method bcp pairs labelled row i with unlabelled row i, so a batch needs as many "
                             f"unlabelled as labelled rows, but found {rows - lb} unlabelled and {lb} labelled")
        if not self.teacher_initialised:
            self._start_selftrain()
        self._prepare_teacher(batch.image)
        a, b = _halves(lb)
        x_l, y_l, x_u = batch.image[:lb], batch.label[:lb], batch.image[lb:]
        mask = self._mask(x_l)  # drawn first, then the teacher's and the student's dropout
        keep = bool(self.cfg.bcp_largest_cc)
        with self.passes.around_teacher(), torch.no_grad():  # one pass per half, as BCP (its BatchNorm statistics)
            pl_a = pseudo_label(segmentation_logits(self.teacher(x_u[a]), self.name), keep)
            pl_b = pl_a if b == a else pseudo_label(segmentation_logits(self.teacher(x_u[b]), self.name), keep)
        mixed_1 = copy_paste(x_l[a], x_u[a], mask)
        mixed_2 = copy_paste(x_u[b], x_l[b], mask)
        terms = selftrain_objective(
            self._logits(mixed_1), mixed_target(y_l[a], pl_a, mask),
            self._logits(mixed_2), mixed_target(pl_b, y_l[b], mask),
            mask, self.cfg.bcp_u_weight,
        )
        terms["pseudo_foreground"] = torch.cat([pl_a, pl_b]).gt(0).float().mean()
        return terms["loss"], floats_for_log(terms, self.logged_selftrain)  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """The teacher, whether it was set from the student, the stage-1 student (once kept) and the generator's state."""
        state: dict[str, Any] = {"teacher": self.teacher.state_dict(), "teacher_initialised": self.teacher_initialised}
        if self._pretrain_weights is not None:
            state["pretrain_student"] = self._pretrain_weights
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            KeyError: if ``state`` holds no ``"teacher"`` or ``"teacher_initialised"`` entry.
        """
        super().load_state_dict(state)
        if "teacher_initialised" not in state:
            raise KeyError(f"{self.name} state needs a 'teacher_initialised' entry, but found keys {sorted(state)}")
        self.teacher_initialised = bool(state["teacher_initialised"])
        pretrain = state.get("pretrain_student")
        self._pretrain_weights = {k: v.detach().cpu().clone() for k, v in pretrain.items()} if pretrain else None
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])
