"""Monte-Carlo dropout uncertainty of the teacher (UA-MT, Yu et al. 2019; UG-MCL, SPEC section 3).

The teacher runs T times in train mode (dropout on), each pass on the input plus fresh clipped Gaussian
noise; the uncertainty is the entropy of the mean softmax:

    p_bar = (1/T) sum_t softmax(f(x + n_t)),   n_t = clamp(sigma * N(0, 1), -c, c)
    U     = -sum_c p_bar_c log(p_bar_c + 1e-6)

U lies in [0, ln C] (up to the 1e-6), ln 2 for two classes. :func:`uncertainty_threshold` gives the ramped
threshold tau(t) under which a voxel counts as reliable.
"""

from __future__ import annotations

import math
from typing import Callable, cast

import torch
from torch import Tensor, nn

from networks.outputs import segmentation_logits
from utils.ramps import sigmoid_rampup

__all__ = ["entropy_of_mean_softmax", "mc_dropout_uncertainty", "uncertainty_threshold"]

_LOG_EPS = 1e-6  # inside the log, as released


def _entropy(prob: Tensor, eps: float = _LOG_EPS) -> Tensor:
    """-sum_c p_c log(p_c + eps) over axis 1, keeping it: (B, C, ...) -> (B, 1, ...)."""
    return -torch.sum(prob * torch.log(prob + eps), dim=1, keepdim=True)


def entropy_of_mean_softmax(logits_stack: Tensor, eps: float = _LOG_EPS) -> tuple[Tensor, Tensor]:
    """Entropy of the mean softmax over T stacked passes.

        p_bar = mean_t softmax(z_t),   U = -sum_c p_bar_c log(p_bar_c + eps)

    Args:
        logits_stack: (T, B, C, D, H, W) logits, pass index first.
        eps: added inside the log (1e-6 as released).
    Returns:
        ``(uncertainty, mean_prob)``: (B, 1, D, H, W) and (B, C, D, H, W).
    Raises:
        ValueError: if ``logits_stack`` has fewer than 3 axes or no pass.
    """
    if logits_stack.dim() < 3 or logits_stack.shape[0] == 0:
        raise ValueError(f"logits_stack must be (T, B, C, ...) with T >= 1, but found {tuple(logits_stack.shape)}")
    mean_prob = torch.softmax(logits_stack, dim=2).mean(dim=0)
    return _entropy(mean_prob, eps), mean_prob


@torch.no_grad()
def mc_dropout_uncertainty(
    teacher: nn.Module,
    image: Tensor,
    passes: int = 8,
    noise_std: float = 0.1,
    noise_clip: float = 0.2,
    chunk: int = 0,
    generator: torch.Generator | None = None,
    logits_fn: Callable[[object], Tensor] | None = None,
    eps: float = _LOG_EPS,
    forward: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Entropy of the teacher's mean softmax over ``passes`` noisy, dropout-on forward passes.

    All the noise, (T, B, C_in, D, H, W), is drawn first, then the passes run ``chunk`` at a time, each chunk
    as one forward of a (chunk * B)-row batch. So the chunk size changes speed and memory, not the input
    noise; only the dropout masks (drawn by the network) depend on it. The teacher is put in train mode for
    the passes (UG-MCL keeps it there anyway) and its previous mode is restored afterwards. Nothing is
    recorded for autograd.

    Args:
        teacher: the network; returns logits, or a tuple whose last element is the logits
            (``(dis, logits)`` for ``unet_3D_dt``), unless ``logits_fn`` says otherwise.
        image: x, (B, C_in, D, H, W); any batch and patch size the network accepts.
        passes: T >= 1 (8 as released; odd values work).
        noise_std: sigma of the Gaussian input noise.
        noise_clip: c, the noise is clamped to [-c, c].
        chunk: passes stacked into one forward; 0 means all T at once.
        generator: draws the noise (on its own device; the noise is then moved to ``image``'s device).
            ``None`` uses the global RNG.
        logits_fn: maps the network output to its (B, C, D, H, W) logits.
        eps: added inside the log (1e-6 as released).
        forward: maps one chunk's stacked noisy batch (chunk * B, C_in, D, H, W) to its logits; default
            ``logits_fn(teacher(x))``. A caller can run the chunk in smaller pieces with it (``methods.base.Passes``).
    Returns:
        ``(uncertainty, mean_prob)``: (B, 1, D, H, W) and (B, C, D, H, W).
    Raises:
        ValueError: if ``passes`` < 1, ``chunk`` < 0, ``noise_clip`` < 0 or the teacher's output rows do not match
            its input batch.
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, but found {passes}")
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0 (0 = all passes at once), but found {chunk}")
    if noise_clip < 0:
        raise ValueError(f"noise_clip must be >= 0, but found {noise_clip}")
    extract = logits_fn if logits_fn is not None else segmentation_logits
    run = forward if forward is not None else (lambda x: extract(teacher(x)))
    chunk = passes if chunk == 0 else min(chunk, passes)

    noise_device = generator.device if generator is not None else image.device
    noise = torch.randn((passes, *image.shape), generator=generator, device=noise_device, dtype=image.dtype)
    noise = torch.clamp(noise * noise_std, -noise_clip, noise_clip).to(image.device)

    was_training = teacher.training
    teacher.train()
    try:
        mean_prob = _mean_softmax(run, image, noise, chunk)
    finally:
        teacher.train(was_training)
    return _entropy(mean_prob, eps), mean_prob


def _mean_softmax(run: Callable[[Tensor], Tensor], image: Tensor, noise: Tensor, chunk: int) -> Tensor:
    """``(1/T) sum_t softmax(run(x + n_t))`` over the T = ``len(noise)`` passes, run ``chunk`` at a time.

    Raises:
        ValueError: if ``run`` returns another number of rows than it was given.
    """
    passes, batch = noise.shape[0], image.shape[0]
    prob_sum: Tensor | None = None
    for start in range(0, passes, chunk):
        n = min(chunk, passes - start)
        noisy = (image.unsqueeze(0) + noise[start : start + n]).reshape(n * batch, *image.shape[1:])
        logits = run(noisy)
        if logits.shape[0] != n * batch:
            raise ValueError(
                f"the teacher returned {logits.shape[0]} rows for an input of {n * batch} rows "
                f"({n} passes x batch {batch})"
            )
        prob = torch.softmax(logits.float(), dim=1).reshape(n, batch, *logits.shape[1:])
        # Add the passes one by one, in order, so the sum does not depend on the chunk size.
        for p in prob:
            prob_sum = p.clone() if prob_sum is None else prob_sum.add_(p)
    return cast(Tensor, prob_sum) / passes  # passes >= 1, so the sum exists


def uncertainty_threshold(
    step: int, rampup_length: float, start: float = 0.75, end: float = 1.0, num_classes: int = 2
) -> float:
    """The ramped entropy threshold of UA-MT / UG-MCL.

        tau(t) = (start + (end - start) * sigmoid_rampup(t, L)) * ln C

    Released: start 0.75, end 1.0, L = max_iterations, C = 2 (``ln 2``, the largest two-class entropy).

    Args:
        step: the iteration t.
        rampup_length: L.
        start: fraction of ln C at t = 0 (times exp(-5) of the ramp).
        end: fraction of ln C at t >= L.
        num_classes: C.
    Raises:
        ValueError: if ``num_classes`` < 2 or ``rampup_length`` < 0.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, but found {num_classes}")
    return (start + (end - start) * sigmoid_rampup(step, rampup_length)) * math.log(num_classes)
