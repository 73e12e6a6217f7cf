"""UG-MCL: uncertainty-guided mutual consistency learning (Zhang et al., AIIM 2022; SPEC section 3).

A dual-task student ``(d, z) = f(x)`` (tanh "distance" output d, segmentation logits z, each with C channels)
and its EMA teacher. Per iteration, with the first ``labeled_bs`` rows labelled, labels y in {0 .. C-1}
(0 = background), p = softmax(z), q = the teacher's softmax on one noisy pass, U the teacher's Monte-Carlo
uncertainty (``utils.uncertainty``):

    L_sup   = 0.5 * (CE(z_l, y) + Dice_fg(p_l, y) + Dice_fg(sigmoid(-k d_l), y))
    Dice_fg(s, y) = Dice(s[:, 1], 1[y = 1])                                   C = 2, the released term
                  = (1/(C-1)) sum_{c=1}^{C-1} Dice(s[:, c], 1[y = c])          C > 2, mean over the foreground
    w(t)    = consistency * sigmoid_rampup(t // interval, consistency_rampup)
    tau(t)  = (start + (end - start) * sigmoid_rampup(t, threshold_rampup)) * ln C,   M = 1[U < tau(t)]
    L_intra = 0.5 * sum(M (p - q)^2) / (C sum(M) + 1e-16)             (whole batch; released: 2 sum(M), C = 2)
    L_cross = mean((sigmoid(-k d) - p)^2)                               (whole batch, all C channels, unmasked)
    L       = L_sup + w(t) * L_intra + w(t) * L_cross

Dice is ``utils.losses.dice_loss`` (pooled over the batch), Dice_fg ``utils.losses.foreground_dice_loss``; U lies
in [0, ln C], so tau(t) scales with ln C (ln 2 as released). L_intra is the mean of (p - q)^2 over the kept
voxel-class pairs. For C = 2 every term is the released one, bit for bit.

Variant ``"released"`` (default) is exactly the published code, ``d = tanh(z)``. Variant ``"paper"`` follows the
paper: the student has a separate SDF head (``VNet_dt``), and

* the supervised part adds ``L_sdf = mean((d_l - sdf_gt)^2)``, weight 1, outside the 0.5: channel c of a
  C-channel head is regressed to the ground-truth SDF of ``label == c`` for every c = 0 .. C-1 (``utils.sdf``, DTC
  convention); a one-channel head is regressed to the SDF of the whole foreground ``label > 0``, and then its
  Dice term is ``Dice(sigmoid(-k d_l)[:, 0], 1[y > 0])`` and L_cross compares sigmoid(-k d) with
  ``sum_{c >= 1} p_c`` (``p[:, 1]`` for C = 2);
* ``L_intra = 0.5 * (beta * S_seg + (1 - beta) * S_sdf)`` with S_seg = sum(M (p - q)^2) / (C sum(M) + 1e-16)
  (the released term before its 0.5) and S_sdf the same masked mean of ``(d - d_teacher)^2`` over the
  teacher's SDF output on the same noisy pass, same mask M (its denominator counts the head's C or 1 channels).
  With beta = 1 this is the released term.

The paper and the released code are two-class (background / foreground); C > 2 uses the rules above.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor, nn

from methods.base import Batch, EMATeacherMethod, Passes, Term
from networks.outputs import segmentation_logits
from utils.losses import (
    ce_loss,
    cross_task_consistency,
    dice_loss,
    foreground_dice_loss,
    masked_consistency,
    sdf_regression_loss,
    sdf_to_mask,
    softmax_mse,
)
from utils.ramps import consistency_weight
from utils.sdf import compute_sdf_torch
from utils.uncertainty import mc_dropout_uncertainty, uncertainty_threshold

if TYPE_CHECKING:
    from engine.config import TrainConfig

__all__ = ["UGMCL", "VARIANTS", "Variant", "distance_dice_loss", "ground_truth_sdf", "ugmcl_objective"]

Variant = Literal["released", "paper"]
VARIANTS: tuple[str, ...] = ("released", "paper")


def ground_truth_sdf(label: Tensor, channels: int) -> Tensor:
    """Ground-truth SDF targets for an SDF head with ``channels`` outputs.

    Args:
        label: (B, D, H, W) integer labels in {0 .. C-1}, 0 = background.
        channels: 1 (the SDF of the whole foreground ``label > 0``) or C >= 2 (channel c = SDF of ``label == c``,
            c = 0 .. C-1).
    Returns:
        (B, channels, D, H, W) float32 on the label's device, in [-1, 1] (``utils.sdf.compute_sdf``).
    Raises:
        ValueError: if ``channels`` < 1.
    """
    if channels < 1:
        raise ValueError(f"an SDF head must have 1 or C >= 2 channels, but found {channels}")
    if channels == 1:
        return compute_sdf_torch(label > 0).unsqueeze(1)
    return torch.stack([compute_sdf_torch(label == c) for c in range(channels)], dim=1)


def _check_inputs(
    student_dis: Tensor,
    student_logits: Tensor,
    teacher_logits: Tensor,
    uncertainty: Tensor,
    label: Tensor,
    labeled_bs: int,
    variant: str,
    beta: float,
    teacher_dis: Tensor | None,
) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, but found {variant!r}")
    if student_logits.dim() < 3 or student_logits.shape[1] < 2:
        raise ValueError(
            f"student_logits must be (B, C, D, H, W) with C >= 2 classes, but found {tuple(student_logits.shape)}"
        )
    batch, classes, spatial = student_logits.shape[0], student_logits.shape[1], student_logits.shape[2:]
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} must match student_logits {tuple(student_logits.shape)}"
        )
    dis_channels = (classes,) if variant == "released" else (1, classes)
    if (
        student_dis.dim() != student_logits.dim()
        or student_dis.shape[0] != batch
        or student_dis.shape[2:] != spatial
        or student_dis.shape[1] not in dis_channels
    ):
        raise ValueError(
            f"student_dis {tuple(student_dis.shape)} must be (B, C, D, H, W) with C in {dis_channels} for variant "
            f"{variant!r} and match student_logits {tuple(student_logits.shape)}"
        )
    if uncertainty.shape != (batch, 1, *spatial):
        raise ValueError(f"uncertainty must be {(batch, 1, *spatial)}, but found {tuple(uncertainty.shape)}")
    if label.shape != (batch, *spatial):
        raise ValueError(f"label must be {(batch, *spatial)}, but found {tuple(label.shape)}")
    if not 1 <= labeled_bs <= batch:
        raise ValueError(f"labeled_bs must be in [1, {batch}], but found {labeled_bs}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], but found {beta}")
    if variant == "paper" and (teacher_dis is None or teacher_dis.shape != student_dis.shape):
        found = None if teacher_dis is None else tuple(teacher_dis.shape)
        raise ValueError(f"variant 'paper' needs teacher_dis of shape {tuple(student_dis.shape)}, but found {found}")


def ugmcl_objective(
    student_dis: Tensor,
    student_logits: Tensor,
    teacher_logits: Tensor,
    uncertainty: Tensor,
    label: Tensor,
    labeled_bs: int,
    step: int,
    *,
    threshold_rampup: float,
    consistency: float = 0.1,
    consistency_rampup: float = 200.0,
    consistency_interval: int = 150,
    threshold_start: float = 0.75,
    threshold_end: float = 1.0,
    sdf_k: float = 1500.0,
    variant: Variant = "released",
    beta: float = 0.75,
    teacher_dis: Tensor | None = None,
    gt_sdf: Tensor | None = None,
) -> dict[str, Term]:
    """Every term of the UG-MCL loss for one batch (equations in the module docstring).

    Args:
        student_dis: d, (B, C, D, H, W); ``tanh(z)`` in the released network. Variant ``"paper"``: the SDF
            head's output, (B, C, D, H, W) or (B, 1, D, H, W).
        student_logits: z, (B, C, D, H, W) with C >= 2 classes, with gradient.
        teacher_logits: the teacher's logits on one noisy pass, (B, C, D, H, W) (the consistency target).
        uncertainty: U, (B, 1, D, H, W), from ``utils.uncertainty``.
        label: y, (B, D, H, W) int64 in {0 .. C-1}; only the first ``labeled_bs`` rows are read.
        labeled_bs: number of labelled rows at the start of the batch (>= 1).
        step: the 0-based iteration t.
        threshold_rampup: L of the threshold ramp (``max_iterations`` as released).
        consistency, consistency_rampup, consistency_interval: the weight ramp w(t): final weight (0.1), length
            in units of ``consistency_interval`` iterations (200), iterations per ramp step (150).
        threshold_start, threshold_end: tau / ln C at the start (before the ramp factor) and the end of its ramp
            (0.75, 1.0).
        sdf_k: k of the SDF-to-mask transform sigmoid(-k d) (1500).
        variant: ``"released"`` or ``"paper"``.
        beta: paper variant: weight of the segmentation consistency in the intra-task term (0.75).
        teacher_dis: paper variant: the teacher's SDF output on the same noisy pass, shaped like ``student_dis``.
        gt_sdf: paper variant: ground-truth SDF of the labelled rows, (labeled_bs, C_dis, D, H, W); computed from
            ``label`` with :func:`ground_truth_sdf` when ``None``.
    Returns:
        dict with tensors ``loss`` (the scalar to back-propagate), ``supervised_loss``, ``loss_seg`` (CE),
        ``loss_seg_dice``, ``loss_dis_dice``, ``uncertainty``, ``mask`` (B, 1, D, H, W) float,
        ``consistency_dist`` (L_intra), ``consistency_loss`` (w * L_intra), ``cross_task_dist`` (L_cross),
        ``cross_task_loss`` (w * L_cross); floats ``consistency_weight`` and ``threshold``; variant ``"paper"``
        adds ``loss_sdf``, ``seg_consistency_dist`` and ``sdf_consistency_dist``.
    Raises:
        ValueError: if a shape, ``labeled_bs``, ``variant`` or ``beta`` is invalid.
    """
    _check_inputs(
        student_dis, student_logits, teacher_logits, uncertainty, label, labeled_bs, variant, beta, teacher_dis
    )
    # Float32 throughout, also under autocast: sigmoid(-1500 d) and the small consistency terms need the precision.
    student_dis, student_logits, teacher_logits = student_dis.float(), student_logits.float(), teacher_logits.float()
    teacher_dis = None if teacher_dis is None else teacher_dis.float()
    terms = _supervised_terms(student_dis, student_logits, label, labeled_bs, sdf_k, variant, gt_sdf)

    weight = consistency_weight(step, consistency, consistency_rampup, consistency_interval)
    num_classes = student_logits.shape[1]
    threshold = uncertainty_threshold(step, threshold_rampup, threshold_start, threshold_end, num_classes)
    mask = (uncertainty < threshold).to(student_logits.dtype)
    terms["consistency_weight"] = weight
    terms["threshold"] = threshold
    terms["uncertainty"] = uncertainty
    terms["mask"] = mask
    terms.update(_intra_task_terms(student_dis, student_logits, teacher_logits, teacher_dis, mask, variant, beta))
    terms["consistency_loss"] = weight * terms["consistency_dist"]

    terms["cross_task_dist"] = cross_task_consistency(student_dis, student_logits, sdf_k)
    terms["cross_task_loss"] = weight * terms["cross_task_dist"]
    terms["loss"] = terms["supervised_loss"] + terms["consistency_loss"] + terms["cross_task_loss"]
    return terms


def distance_dice_loss(dis_mask: Tensor, label: Tensor) -> Tensor:
    """Dice of the masks implied by the distance output, ``Dice_fg(sigmoid(-k d), y)`` (module docstring).

        C channels:  (1/(C-1)) sum_{c=1}^{C-1} Dice(m_c, 1[y = c])      (C = 2: Dice(m_1, 1[y = 1]), as released)
        1 channel:   Dice(m_0, 1[y > 0])                                  (a head regressing the foreground SDF)

    Args:
        dis_mask: m = sigmoid(-k d), (B, C, D, H, W) or (B, 1, D, H, W).
        label: y, (B, D, H, W) integer in {0 .. C-1}.
    Raises:
        ValueError: if the shapes do not fit together.
    """
    if dis_mask.dim() >= 2 and dis_mask.shape[1] == 1:
        return dice_loss(dis_mask[:, 0], label > 0)
    return foreground_dice_loss(dis_mask, label)


def _supervised_terms(
    student_dis: Tensor, student_logits: Tensor, label: Tensor, labeled_bs: int, sdf_k: float, variant: str,
    gt_sdf: Tensor | None,
) -> dict[str, Term]:
    """L_sup of the labelled rows and its parts: ``loss_seg``, ``loss_seg_dice``, ``loss_dis_dice``, (paper)
    ``loss_sdf``, and ``supervised_loss``."""
    lb = labeled_bs
    prob = torch.softmax(student_logits, dim=1)
    dis_to_mask = sdf_to_mask(student_dis, sdf_k)

    terms: dict[str, Term] = {}
    terms["loss_seg"] = ce_loss(student_logits[:lb], label[:lb])
    terms["loss_seg_dice"] = foreground_dice_loss(prob[:lb], label[:lb])
    terms["loss_dis_dice"] = distance_dice_loss(dis_to_mask[:lb], label[:lb])
    supervised = 0.5 * (terms["loss_seg"] + terms["loss_seg_dice"] + terms["loss_dis_dice"])
    if variant == "paper":
        if gt_sdf is None:
            gt_sdf = ground_truth_sdf(label[:lb], student_dis.shape[1])
        terms["loss_sdf"] = sdf_regression_loss(student_dis[:lb], gt_sdf)
        supervised = supervised + terms["loss_sdf"]
    terms["supervised_loss"] = supervised
    return terms


def _intra_task_terms(
    student_dis: Tensor, student_logits: Tensor, teacher_logits: Tensor, teacher_dis: Tensor | None, mask: Tensor,
    variant: str, beta: float,
) -> dict[str, Tensor]:
    """L_intra as ``consistency_dist``, with (paper) its parts ``seg_consistency_dist`` and ``sdf_consistency_dist``."""
    seg_dist = masked_consistency(softmax_mse(student_logits, teacher_logits), mask)
    if variant != "paper":
        return {"consistency_dist": 0.5 * seg_dist}
    sdf_dist = masked_consistency((student_dis - cast(Tensor, teacher_dis)) ** 2, mask)  # checked by _check_inputs
    return {
        "seg_consistency_dist": seg_dist,
        "sdf_consistency_dist": sdf_dist,
        "consistency_dist": 0.5 * (beta * seg_dist + (1.0 - beta) * sdf_dist),
    }


def _dual_output(output: Any, who: str) -> tuple[Tensor, Tensor]:
    """``(dis, logits)`` of a dual-task network's output, or a clear error."""
    if not (isinstance(output, (tuple, list)) and len(output) == 2):
        raise ValueError(
            f"UG-MCL needs a dual-task network returning (dis, logits) such as unet_3D_dt or VNet_dt; the {who} "
            f"returned {type(output).__name__}"
            + (f" of length {len(output)}" if isinstance(output, (tuple, list)) else "")
        )
    return output[0], output[1]


_LOGGED = (
    "loss",
    "supervised_loss",
    "loss_seg",
    "loss_seg_dice",
    "loss_dis_dice",
    "loss_sdf",
    "consistency_dist",
    "seg_consistency_dist",
    "sdf_consistency_dist",
    "consistency_loss",
    "cross_task_dist",
    "cross_task_loss",
)


class UGMCL(EMATeacherMethod):
    """UG-MCL with an EMA teacher; hyper-parameters from ``engine.config.TrainConfig``.

    Reads ``variant``, ``consistency``, ``consistency_rampup``, ``consistency_interval``, ``mc_passes``,
    ``mc_chunk``, ``noise_std``, ``noise_clip``, ``threshold_start``, ``threshold_end``, ``threshold_rampup``
    (``None``: ``max_iterations``), ``sdf_k``, ``ema_decay``, ``beta``, ``low_memory`` and ``num_classes`` (2 as
    released; any C >= 2).

    The teacher is a copy of the student and stays in train mode (dropout on), as released.

    Order of work in a step, one switch (``low_memory``):

    * released (``low_memory=0``, or passes that cannot reserve the student's random numbers): the student's
      forward, then the teacher's noisy pass and its T Monte-Carlo passes, ``mc_chunk`` passes (``mc_chunk * B``
      rows) per forward;
    * low-memory (default): the student's random numbers are reserved first (``Passes.reserve_randomness``), the
      teacher's passes run before the student's forward and each chunk runs as forwards of B rows
      (``Passes.forward_in_pieces``), so the teacher's temporaries and the student's saved activations are never
      alive together. The random numbers, masks and losses are those of the released order on CPU; on CUDA the
      masks drawn ahead use other random offsets, which gives another, equally valid random draw.

    Args:
        student: dual-task network returning ``(dis, logits)`` (``unet_3D_dt``; ``VNet_dt`` for the paper variant).
        cfg, passes, forward, generator: as :class:`methods.base.EMATeacherMethod`.
    Raises:
        ValueError: for an invalid option or combination.
    """

    name = "ugmcl"
    uses_unlabeled = True

    def __init__(self, student: nn.Module, cfg: TrainConfig, passes: Passes | None = None,
                 forward: nn.Module | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__(student, cfg, passes, forward, generator)
        self.threshold_rampup = cfg.max_iterations if cfg.threshold_rampup is None else cfg.threshold_rampup
        self._last_uncertainty: Tensor | None = None

    @classmethod
    def model_for(cls, cfg: TrainConfig) -> str:
        """``unet_3D_dt`` as released; ``vnet_dt`` (a separate SDF head) for the paper variant."""
        return "vnet_dt" if cfg.variant == "paper" else "unet_3D_dt"

    def _low_memory_order(self) -> bool:
        return bool(self.cfg.low_memory) and self.student.training and self.passes.can_reserve(self.student)

    def _teacher_targets(self, image: Tensor, low_memory: bool) -> tuple[Tensor, Tensor, Tensor]:
        """The teacher's ``(dis, logits)`` on one noisy pass, then the uncertainty U of its T noisy passes."""
        cfg, rows = self.cfg, image.shape[0]

        def run(x: Tensor, read: Any = None) -> Any:
            if low_memory:
                return self.passes.forward_in_pieces(self.teacher, x, rows, read)
            return self.teacher(x) if read is None else read(self.teacher(x))

        with self.passes.around_teacher():
            with torch.no_grad():
                teacher_dis, teacher_logits = _dual_output(run(self._noisy(image)), "teacher")
            uncertainty, _ = mc_dropout_uncertainty(
                self.teacher, image, passes=cfg.mc_passes, noise_std=cfg.noise_std, noise_clip=cfg.noise_clip,
                chunk=cfg.mc_chunk, generator=self.generator, forward=lambda x: run(x, segmentation_logits),
            )
        return teacher_dis, teacher_logits, uncertainty

    def training_step(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Student forward, one noisy teacher pass (target), T noisy passes (uncertainty), the objective."""
        cfg = self.cfg
        image, label = batch.image, batch.label
        self._prepare_teacher(image)
        if self._low_memory_order():
            # the student's dropout draws happen where its forward would draw them: the teacher's passes get the
            # random numbers of the released order, and the student's saved activations are not yet alive
            self.passes.reserve_randomness(self.student, image.shape)
            teacher_dis, teacher_logits, uncertainty = self._teacher_targets(image, low_memory=True)
            student_dis, student_logits = _dual_output(self.run_student(image), "student")
        else:
            student_dis, student_logits = _dual_output(self.run_student(image), "student")
            teacher_dis, teacher_logits, uncertainty = self._teacher_targets(image, low_memory=False)
        terms = ugmcl_objective(
            student_dis, student_logits, teacher_logits, uncertainty, label, batch.labeled_bs, step,
            threshold_rampup=self.threshold_rampup,
            consistency=cfg.consistency,
            consistency_rampup=cfg.consistency_rampup,
            consistency_interval=cfg.consistency_interval,
            threshold_start=cfg.threshold_start,
            threshold_end=cfg.threshold_end,
            sdf_k=cfg.sdf_k,
            variant=cfg.variant,  # type: ignore[arg-type]
            beta=cfg.beta,
            teacher_dis=teacher_dis if cfg.variant == "paper" else None,
        )
        self._last_uncertainty = uncertainty[0, 0].detach()
        return terms["loss"], _logs(terms, uncertainty)  # type: ignore[return-value]

    def images_to_log(self) -> dict[str, Tensor]:
        """The last step's uncertainty U of sample 0, (D, H, W)."""
        return {} if self._last_uncertainty is None else {"uncertainty": self._last_uncertainty}

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        """The options of every method (:meth:`methods.base.Method.check_config`), then UG-MCL's own."""
        super().check_config(cfg)
        if cfg.variant not in VARIANTS:
            raise ValueError(f"--variant must be one of {VARIANTS}, got {cfg.variant!r}")


def _logs(terms: dict[str, Term], uncertainty: Tensor) -> dict[str, float]:
    """The logged floats of a step, read from the device with one synchronisation."""
    names = [k for k in _LOGGED if k in terms]
    values = [terms[k].detach().float() for k in names]  # type: ignore[union-attr]
    names += ["mask_ratio", "uncertainty_mean"]
    values += [terms["mask"].mean().float(), uncertainty.mean().float()]  # type: ignore[union-attr]
    logs = dict(zip(names, torch.stack(values).tolist()))
    logs["consistency_weight"] = float(terms["consistency_weight"])
    logs["threshold"] = float(terms["threshold"])
    return logs
