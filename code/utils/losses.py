"""The loss terms of UG-MCL (SPEC section 3), each a small pure function that reads like its equation.

The method (``methods/ugmcl.py``) combines them and applies the ramp-up weights; nothing here knows about
iterations, teachers or which rows of the batch are labelled.

Shapes: logits, probabilities and SDF outputs are ``(B, C, D, H, W)`` (any number of spatial axes works);
labels are ``(B, D, H, W)`` integers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ce_loss",
    "cross_task_consistency",
    "dice_loss",
    "entropy_loss",
    "foreground_dice_loss",
    "kl_divergence_map",
    "masked_consistency",
    "multiclass_dice_loss",
    "sdf_regression_loss",
    "sdf_to_mask",
    "softmax_mse",
    "uncertainty_rectified_consistency",
]


def _same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape")


def dice_loss(score: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Soft Dice loss, pooled over every element of the batch (as released, not averaged per sample).

        L = 1 - (2 sum(s t) + smooth) / (sum(s^2) + sum(t^2) + smooth)

    An empty target and an all-zero score give ``1 - smooth / smooth = 0``.

    Args:
        score: predicted foreground probabilities s, e.g. ``softmax(z)[:, 1]`` of shape (B, D, H, W).
        target: binary target t of the same shape (bool, int or float; cast to ``score``'s dtype).
        smooth: the smoothing constant (1e-5 in the released code).
    Raises:
        ValueError: if the shapes differ.
    """
    _same_shape(score, target, "score", "target")
    target = target.to(score.dtype)
    intersect = torch.sum(score * target)
    return 1.0 - (2.0 * intersect + smooth) / (torch.sum(score * score) + torch.sum(target * target) + smooth)


def ce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross entropy ``-mean(log softmax(z)[y])`` over every voxel of the batch.

    Args:
        logits: z, (B, C, D, H, W).
        target: class indices y, (B, D, H, W), integer (cast to int64).
    Raises:
        ValueError: if ``target`` is not ``logits`` without its class axis.
    """
    if logits.dim() < 2 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"target must have the logits' shape without the class axis: logits {tuple(logits.shape)}, "
            f"target {tuple(target.shape)}"
        )
    return F.cross_entropy(logits, target.long())


def sdf_to_mask(sdf: Tensor, k: float = 1500.0) -> Tensor:
    """Soft mask implied by a signed distance map, ``sigmoid(-k d)`` (about 1 inside, where d < 0).

    Args:
        sdf: d, any shape, negative inside the object.
        k: steepness (1500 in the released code).
    """
    return torch.sigmoid(-k * sdf)


def softmax_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Element-wise squared gap of the two softmax outputs, ``(softmax(z_s) - softmax(z_t))^2``, unreduced.

    Args:
        student_logits: z_s, (B, C, D, H, W).
        teacher_logits: z_t, same shape (normally computed without gradient).
    Returns:
        (B, C, D, H, W).
    Raises:
        ValueError: if the shapes differ.
    """
    _same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
    return (torch.softmax(student_logits, dim=1) - torch.softmax(teacher_logits, dim=1)) ** 2


def masked_consistency(dist: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``dist`` over the voxels the mask keeps, with the released normalisation.

        L = sum(M * dist) / (r * sum(M) + 1e-16),   r = C_dist / C_mask

    The released code writes ``2 * sum(M)``: its mask is (B, 1, D, H, W) and broadcasts over the two class
    channels of ``dist``, so r = 2 there and L is the mean over the kept voxel-channel pairs. An all-zero
    mask gives 0.

    Args:
        dist: (B, C, D, H, W) per-element distances, e.g. :func:`softmax_mse`.
        mask: M, (B, 1, D, H, W) or (B, C, D, H, W), 1 where the voxel counts (float or bool).
    Raises:
        ValueError: if the mask does not broadcast over ``dist`` this way.
    """
    if (
        mask.dim() != dist.dim()
        or dist.dim() < 2
        or mask.shape[0] != dist.shape[0]
        or mask.shape[2:] != dist.shape[2:]
        or mask.shape[1] not in (1, dist.shape[1])
    ):
        raise ValueError(
            f"mask {tuple(mask.shape)} must be (B, 1, ...) or (B, C, ...) with the spatial shape of "
            f"dist {tuple(dist.shape)}"
        )
    mask = mask.to(dist.dtype)
    ratio = dist.shape[1] // mask.shape[1]
    return torch.sum(mask * dist) / (ratio * torch.sum(mask) + 1e-16)


def cross_task_consistency(sdf: Tensor, seg_logits: Tensor, k: float = 1500.0) -> Tensor:
    """Gap between the mask implied by the SDF and the predicted probabilities.

        L = mean((sigmoid(-k * d) - softmax(z))^2)   over every element of the whole batch, unmasked

    A one-channel SDF output (a head regressing the SDF of the whole foreground ``label > 0``) is compared with
    the foreground probability ``sum_{c >= 1} softmax(z)_c``, which is ``softmax(z)[:, 1:]`` when C = 2.

    Args:
        sdf: tanh SDF output d, (B, C, D, H, W) or (B, 1, D, H, W), negative inside the object.
        seg_logits: segmentation logits z, (B, C, D, H, W), C >= 2.
        k: steepness of the SDF-to-mask transform (1500 in the released code).
    Raises:
        ValueError: if the shapes do not fit together.
    """
    prob = torch.softmax(seg_logits, dim=1)
    if sdf.dim() == prob.dim() and sdf.shape[1] == 1 and prob.shape[1] >= 2:
        prob = prob[:, 1:] if prob.shape[1] == 2 else prob[:, 1:].sum(dim=1, keepdim=True)
    _same_shape(sdf, prob, "sdf", "softmax(seg_logits)")
    return torch.mean((sdf_to_mask(sdf, k) - prob) ** 2)


def sdf_regression_loss(pred_sdf: Tensor, gt_sdf: Tensor) -> Tensor:
    """Mean squared error between the predicted and the ground-truth SDF (the paper's L_sdf, as in DTC).

        L = mean((d - d_gt)^2)

    Args:
        pred_sdf: d, e.g. (B, D, H, W) or (B, C, D, H, W).
        gt_sdf: d_gt, same shape (see ``utils.sdf.compute_sdf``).
    Raises:
        ValueError: if the shapes differ.
    """
    _same_shape(pred_sdf, gt_sdf, "pred_sdf", "gt_sdf")
    return torch.mean((pred_sdf - gt_sdf.to(pred_sdf.dtype)) ** 2)


# ----------------------------------------------------------------------------------------------
# terms of the baselines (SSL4MIS entropy minimisation and Dice, URPC); appended, the terms above are unchanged
# ----------------------------------------------------------------------------------------------
def multiclass_dice_loss(prob: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Soft Dice loss averaged over the classes, as SSL4MIS's ``DiceLoss(C)`` on softmax outputs.

        L = (1/C) sum_c [1 - (2 sum(p_c t_c) + smooth) / (sum(p_c^2) + sum(t_c^2) + smooth)],   t_c = 1[y = c]

    Each class is pooled over the whole batch (:func:`dice_loss`); a class absent from both the target and
    the prediction contributes 0.

    Args:
        prob: class probabilities p, (B, C, D, H, W), e.g. ``softmax(z)``.
        target: class indices y, (B, D, H, W), integer.
        smooth: the smoothing constant (1e-5 as released).
    Raises:
        ValueError: if ``target`` is not ``prob`` without its class axis.
    """
    if prob.dim() < 2 or target.shape != prob.shape[:1] + prob.shape[2:]:
        raise ValueError(
            f"target must have the probabilities' shape without the class axis: prob {tuple(prob.shape)}, "
            f"target {tuple(target.shape)}"
        )
    num_classes = prob.shape[1]
    return sum(dice_loss(prob[:, c], target == c, smooth) for c in range(num_classes)) / num_classes


def foreground_dice_loss(prob: Tensor, target: Tensor, smooth: float = 1e-5) -> Tensor:
    """Soft Dice loss averaged over the foreground classes c = 1 .. C-1 (background left out).

        L = (1/(C-1)) sum_{c=1}^{C-1} Dice(p_c, 1[y = c])          (:func:`dice_loss`, each pooled over the batch)

    For C = 2 this is ``dice_loss(prob[:, 1], target == 1)`` bit for bit, the foreground term of the released
    UA-MT / UG-MCL / DTC code. A class absent from both the target and the prediction contributes 0.

    Args:
        prob: class probabilities p, (B, C, D, H, W) with C >= 2, e.g. ``softmax(z)`` or ``sigmoid(-k d)``.
        target: class indices y, (B, D, H, W), integer.
        smooth: the smoothing constant (1e-5 as released).
    Raises:
        ValueError: if ``prob`` has fewer than 2 classes or ``target`` is not ``prob`` without its class axis.
    """
    if prob.dim() < 2 or prob.shape[1] < 2:
        raise ValueError(f"prob must be (B, C, ...) with C >= 2 classes, but found {tuple(prob.shape)}")
    if target.shape != prob.shape[:1] + prob.shape[2:]:
        raise ValueError(
            f"target must have the probabilities' shape without the class axis: prob {tuple(prob.shape)}, "
            f"target {tuple(target.shape)}"
        )
    num_classes = prob.shape[1]
    if num_classes == 2:
        return dice_loss(prob[:, 1], target == 1, smooth)  # the released term, no extra operation
    return sum(dice_loss(prob[:, c], target == c, smooth) for c in range(1, num_classes)) / (num_classes - 1)


def entropy_loss(prob: Tensor, eps: float = 1e-6) -> Tensor:
    """Mean normalised entropy of a softmax output (entropy minimisation; SSL4MIS ``entropy_loss``).

        L = mean over (B, D, H, W) of  -sum_c p_c log(p_c + eps) / ln C

    so L is in [0, 1] (up to eps): 0 for one-hot predictions, 1 for uniform ones.

    Args:
        prob: class probabilities p, (B, C, D, H, W) with C >= 2.
        eps: added inside the log (1e-6 as released).
    Raises:
        ValueError: if ``prob`` has no class axis with at least 2 classes.
    """
    if prob.dim() < 2 or prob.shape[1] < 2:
        raise ValueError(f"prob must be (B, C, ...) with C >= 2 classes, but found {tuple(prob.shape)}")
    entropy = -torch.sum(prob * torch.log(prob + eps), dim=1)
    return torch.mean(entropy) / math.log(prob.shape[1])


def kl_divergence_map(target_prob: Tensor, log_prob: Tensor) -> Tensor:
    """Voxel-wise KL divergence KL(p || q), summed over the class axis (``nn.KLDivLoss(reduction="none")`` summed).

        KL = sum_c p_c (log p_c - log q_c),   with 0 log 0 = 0

    URPC uses it as the uncertainty of pyramid level k, with p the mean of the levels' softmaxes and q the
    level's own softmax.

    Args:
        target_prob: p, (B, C, D, H, W).
        log_prob: log q, same shape (``log_softmax`` of the logits, or ``log`` of the probabilities).
    Returns:
        (B, 1, D, H, W), >= 0.
    Raises:
        ValueError: if the shapes differ.
    """
    _same_shape(target_prob, log_prob, "target_prob", "log_prob")
    return torch.sum(torch.xlogy(target_prob, target_prob) - target_prob * log_prob, dim=1, keepdim=True)


def uncertainty_rectified_consistency(prob: Tensor, target_prob: Tensor, uncertainty: Tensor) -> Tensor:
    """URPC's consistency of one pyramid level, weighted by exp(-uncertainty) (Luo et al. 2021, as in SSL4MIS).

        L = mean((p_bar - p)^2 * exp(-U)) / (mean(exp(-U)) + 1e-8) + mean(U)

    The first mean runs over (B, C, D, H, W), the others over (B, 1, D, H, W), as released. The second term
    keeps the uncertainty itself small.

    Args:
        prob: the level's probabilities p, (B, C, D, H, W).
        target_prob: the mean probabilities p_bar over the levels, same shape.
        uncertainty: U, (B, 1, D, H, W) (:func:`kl_divergence_map`).
    Raises:
        ValueError: if the shapes do not fit together.
    """
    _same_shape(prob, target_prob, "prob", "target_prob")
    if uncertainty.dim() != prob.dim() or uncertainty.shape[1] != 1 or uncertainty.shape[2:] != prob.shape[2:] or (
        uncertainty.shape[0] != prob.shape[0]
    ):
        raise ValueError(
            f"uncertainty {tuple(uncertainty.shape)} must be (B, 1, ...) with the batch and spatial shape of "
            f"prob {tuple(prob.shape)}"
        )
    weight = torch.exp(-uncertainty)
    return torch.mean((target_prob - prob) ** 2 * weight) / (torch.mean(weight) + 1e-8) + torch.mean(uncertainty)
