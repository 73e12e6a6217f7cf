"""Sliding-window prediction of whole volumes from patch-wise predictors (SPEC section 4).

Built from small pure parts, the way nnU-Net builds it:

- :func:`window_starts` -- where the windows start along one axis (last one flush with the end);
- :func:`pad_to_patch` -- zero padding of axes shorter than the patch, with the slicer that undoes it;
- :func:`gaussian_importance_map` -- optional blending weights;
- :func:`predict_sliding_window` -- any ``predict`` callable over all windows, averaged over overlaps;
- :func:`sliding_window_probabilities` / :func:`predict_volume_labels` -- the same for a segmentation network
  (softmax of the segmentation logits; optional mixed precision, flip test-time augmentation and MC-dropout
  uncertainty).

The defaults reproduce the released UG-MCL ``test_single_case``: zero padding split ``pad // 2`` left and the rest
right, ``ceil((size - patch) / stride) + 1`` windows per axis, stride ``(stride_xy, stride_xy, stride_z)``, the
softmax of the segmentation output (last element of a dual-task network's tuple) averaged uniformly over
overlapping windows, argmax, padding cropped away.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from typing import Any, Callable, Iterator, Literal, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from networks.outputs import segmentation_logits
from utils.types import Shape3D

__all__ = [
    "argmax_labels",
    "gaussian_importance_map",
    "pad_to_patch",
    "predict_sliding_window",
    "predict_volume_labels",
    "sliding_window_probabilities",
    "window_starts",
]

Blend = Literal["uniform", "gaussian"]
Predictor = Callable[[Tensor], Tensor]
Unpad = Tuple[Any, slice, slice, slice]
"""``(Ellipsis, slice_d, slice_h, slice_w)``: index any ``(..., D, H, W)`` array with it to drop the padding."""

_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_ENTROPY_EPS = 1e-6  # as the training uncertainty (SPEC section 3): U = -sum_c p log(p + 1e-6)


def _as_triplet(value: int | Sequence[int], name: str) -> Shape3D:
    """Return ``value`` as three positive ints (one int is repeated), or raise a ValueError naming ``name``."""
    values = (value,) * 3 if isinstance(value, (int, np.integer)) else tuple(value)
    if len(values) != 3 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in values):
        raise ValueError(f"{name} must be a positive int or three positive ints, found {value!r}")
    return int(values[0]), int(values[1]), int(values[2])


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis.

    ``n = ceil((size - patch) / stride) + 1`` windows start at ``min(i * stride, size - patch)``, so the last
    window is flush with the end (the original's rule). An axis no longer than the patch gets one window at 0.

    Example: ``window_starts(100, 64, 32) == [0, 32, 36]``.

    Args:
        size: length of the (padded) axis.
        patch: window length along it.
        stride: step between window starts.

    Raises:
        ValueError: if any argument is not a positive int.
    """
    for name, value in (("size", size), ("patch", patch), ("stride", stride)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, found {value!r}")
    if size <= patch:
        return [0]
    count = math.ceil((size - patch) / stride) + 1
    return [min(i * stride, size - patch) for i in range(count)]


def pad_to_patch(image: Tensor, patch: int | Sequence[int]) -> tuple[Tensor, Unpad]:
    """Zero-pad the last three axes of ``image`` up to ``patch`` where they are shorter.

    The padding of an axis is split ``pad // 2`` before and ``pad - pad // 2`` after, as in the original.

    Args:
        image: (C, D, H, W) tensor (any number of leading axes works).
        patch: patch size (pd, ph, pw), or one int for all three.

    Returns:
        ``(padded, unpad)`` with ``padded`` (C, max(D, pd), max(H, ph), max(W, pw)) and ``unpad`` a slicer such
        that ``padded[unpad]`` is ``image`` again; it applies to any ``(..., D', H', W')`` array of the padded
        size (probabilities, labels).

    Raises:
        ValueError: if ``image`` has fewer than 3 axes or ``patch`` is malformed.
    """
    patch = _as_triplet(patch, "patch")
    if image.dim() < 3:
        raise ValueError(f"image must have at least 3 (spatial) axes, found shape {tuple(image.shape)}")
    spatial = tuple(image.shape[-3:])
    pads = [max(p - s, 0) for s, p in zip(spatial, patch)]
    before = [pad // 2 for pad in pads]
    unpad: Unpad = (Ellipsis, *(slice(b, b + s) for b, s in zip(before, spatial)))  # type: ignore[assignment]
    if not any(pads):
        return image, unpad
    # F.pad lists the last axis first: (w_before, w_after, h_before, h_after, d_before, d_after)
    flat_pads: list[int] = []
    for pad, b in reversed(list(zip(pads, before))):
        flat_pads += [b, pad - b]
    return F.pad(image, flat_pads, mode="constant", value=0.0), unpad


def gaussian_importance_map(
    patch: int | Sequence[int],
    sigma_scale: float = 1.0 / 8,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""Separable Gaussian weights for blending overlapping windows (nnU-Net's choice), maximum 1.

    .. math:: w(i, j, k) = \prod_a \exp\big(-(x_a - c_a)^2 / (2 \sigma_a^2)\big),
        \quad c_a = (p_a - 1) / 2, \quad \sigma_a = \text{sigma\_scale} \cdot p_a

    Weights that underflow to 0 are replaced by the smallest positive weight, so every voxel keeps a non-zero
    weight (no division by zero when blending).

    Args:
        patch: patch size (pd, ph, pw), or one int for all three.
        sigma_scale: standard deviation as a fraction of the patch side. Default 1/8.
        device: where to create the map. Default CPU.

    Returns:
        (pd, ph, pw) float32 tensor.

    Raises:
        ValueError: if ``patch`` is malformed or ``sigma_scale`` is not positive.
    """
    patch = _as_triplet(patch, "patch")
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be positive, found {sigma_scale!r}")
    axes = []
    for side in patch:
        x = torch.arange(side, dtype=torch.float64, device=device)
        sigma = sigma_scale * side
        axis = torch.exp(-((x - (side - 1) / 2) ** 2) / (2 * sigma**2))
        axes.append(axis / axis.max())  # an even side has no voxel at the exact centre
    weights = (axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]).float()
    if not bool((weights > 0).all()):
        weights = torch.where(weights > 0, weights, weights[weights > 0].min())
    return weights


def _window_grid(spatial: Sequence[int], patch: Shape3D, stride: Shape3D) -> list[tuple[int, int, int]]:
    """All window start triplets, in the original's x-major order."""
    per_axis = [window_starts(size, p, s) for size, p, s in zip(spatial, patch, stride)]
    return list(itertools.product(*per_axis))


def _predict_with_flips(predict: Predictor, batch: Tensor, tta_flip: bool) -> Tensor:
    """``predict(batch)``, or the mean over the 8 mirrorings of the three spatial axes when ``tta_flip``."""
    if not tta_flip:
        return predict(batch)
    total = None
    flips = [axes for r in range(4) for axes in itertools.combinations((2, 3, 4), r)]
    for axes in flips:
        out = predict(torch.flip(batch, axes) if axes else batch)
        out = (torch.flip(out, axes) if axes else out).float()
        total = out if total is None else total + out
    return total / len(flips)


def predict_sliding_window(
    predict: Predictor,
    image: Tensor,
    patch: int | Sequence[int],
    stride: int | Sequence[int],
    blend: Blend = "uniform",
    batch_size: int = 1,
    tta_flip: bool = False,
) -> Tensor:
    r"""Apply a patch predictor over a whole volume and average the overlapping windows.

    The image is zero-padded to at least the patch size (:func:`pad_to_patch`), cut into the windows of
    :func:`window_starts` along each axis, ``predict`` runs on ``batch_size`` windows at a time, and each output
    voxel is the weighted mean of the window outputs covering it:

    .. math:: P(v) = \frac{\sum_{w \ni v} \omega_w(v)\, \mathrm{predict}(x_w)(v)}{\sum_{w \ni v} \omega_w(v)}

    with ``omega = 1`` for ``blend="uniform"`` (the original: plain average) or
    :func:`gaussian_importance_map` for ``blend="gaussian"``. The padding is cropped from the result.
    Accumulation is in float32 on ``image.device``, under ``torch.inference_mode``.

    Args:
        predict: maps a batch of windows (N, C, pd, ph, pw) to (N, K, pd, ph, pw), e.g. probabilities
            ``lambda x: torch.softmax(net(x)[1], 1)``.
        image: (C, D, H, W) tensor.
        patch: window size (pd, ph, pw), or one int for all three.
        stride: window step per axis (sd, sh, sw), each between 1 and the patch side, or one int.
        blend: ``"uniform"`` (default) or ``"gaussian"``.
        batch_size: windows per ``predict`` call. Default 1.
        tta_flip: average ``predict`` over the 8 mirrorings of the three spatial axes (each window output is
            flipped back first). Default False.

    Returns:
        (K, D, H, W) float32 tensor on ``image.device``.

    Raises:
        ValueError: for an image that is not 4-D, a malformed patch or stride, a stride larger than the patch
            (windows would leave gaps), an unknown ``blend``, ``batch_size < 1``, or a ``predict`` output of the
            wrong shape.
    """
    patch, stride = _checked_windows(image, patch, stride, blend, batch_size)
    with torch.inference_mode():
        padded, unpad = pad_to_patch(image, patch)
        spatial = tuple(padded.shape[1:])
        weight = gaussian_importance_map(patch, device=image.device) if blend == "gaussian" else None
        scores: Tensor | None = None
        weight_sum = torch.zeros(spatial, dtype=torch.float32, device=image.device)
        windows = _window_grid(spatial, patch, stride)
        for first in range(0, len(windows), batch_size):
            group = windows[first : first + batch_size]
            regions = [tuple(slice(s, s + p) for s, p in zip(start, patch)) for start in group]
            out = _predict_windows(predict, padded, regions, patch, tta_flip)
            if scores is None:
                scores = torch.zeros((out.shape[1], *spatial), dtype=torch.float32, device=image.device)
            for window_out, region in zip(out, regions):
                if weight is None:  # uniform: a plain sum and a count, as the original
                    scores[(slice(None), *region)] += window_out
                    weight_sum[region] += 1.0
                else:
                    scores[(slice(None), *region)] += window_out * weight
                    weight_sum[region] += weight
        if scores is None:  # unreachable: every image has at least one window
            raise RuntimeError(f"no windows for image {tuple(image.shape)} and patch {patch}")
        return (scores / weight_sum)[unpad]


def _checked_windows(
    image: Tensor, patch: int | Sequence[int], stride: int | Sequence[int], blend: str, batch_size: int
) -> tuple[Shape3D, Shape3D]:
    """``(patch, stride)`` as triplets, once the options of :func:`predict_sliding_window` are checked."""
    patch = _as_triplet(patch, "patch")
    stride = _as_triplet(stride, "stride")
    if image.dim() != 4:
        raise ValueError(f"image must be (C, D, H, W), found shape {tuple(image.shape)}")
    if any(s > p for s, p in zip(stride, patch)):
        raise ValueError(f"stride {stride} must not exceed patch {patch} on any axis (windows would leave gaps)")
    if blend not in ("uniform", "gaussian"):
        raise ValueError(f"blend must be 'uniform' or 'gaussian', found {blend!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, found {batch_size!r}")
    return patch, stride


def _predict_windows(
    predict: Predictor, padded: Tensor, regions: Sequence[tuple[slice, ...]], patch: Shape3D, tta_flip: bool
) -> Tensor:
    """``predict`` of the stacked windows ``padded[:, region]``, checked, as float32 on ``padded``'s device."""
    batch = torch.stack([padded[(slice(None), *region)] for region in regions])
    out = _predict_with_flips(predict, batch, tta_flip)
    if out.dim() != 5 or out.shape[0] != len(regions) or tuple(out.shape[2:]) != patch:
        raise ValueError(
            f"predict must map {tuple(batch.shape)} to (N, K, {patch[0]}, {patch[1]}, {patch[2]}) "
            f"with N = {len(regions)}, found {tuple(out.shape)}"
        )
    return out.to(device=padded.device, dtype=torch.float32)


def _autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``: CUDA bf16 where supported else fp16, CPU bf16; or None."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16
    raise ValueError(f"amp=True is supported on cuda and cpu devices, found {device.type!r}; use amp=False")


def _set_dropout_train(net: nn.Module) -> None:
    """Eval mode except the dropout layers (MC dropout): norms keep their eval behaviour and running stats."""
    net.eval()
    for module in net.modules():
        if isinstance(module, _DROPOUT_TYPES):
            module.train()


def _as_image_tensor(image: np.ndarray | Tensor, device: torch.device) -> Tensor:
    """(D, H, W) or (C, D, H, W) array or tensor -> (C, D, H, W) float32 tensor on ``device``."""
    tensor = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image)
    if tensor.dim() == 3:
        tensor = tensor[None]
    if tensor.dim() != 4:
        raise ValueError(f"image must be (D, H, W) or (C, D, H, W), found shape {tuple(tensor.shape)}")
    return tensor.to(device=device, dtype=torch.float32)


def sliding_window_probabilities(
    net: nn.Module,
    image: np.ndarray | Tensor,
    patch: int | Sequence[int] = (96, 96, 96),
    stride_xy: int = 64,
    stride_z: int = 64,
    blend: Blend = "uniform",
    batch_size: int = 1,
    tta_flip: bool = False,
    amp: bool = False,
    mc_passes: int = 0,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Softmax probabilities of a segmentation network over a whole volume, optionally with uncertainty.

    Each window's probabilities are ``softmax(z)`` of the network's segmentation logits ``z`` (the output itself,
    or the last element of a tuple such as ``unet_3D_dt``'s ``(tanh(z), z)``), averaged over overlaps by
    :func:`predict_sliding_window` with stride ``(stride_xy, stride_xy, stride_z)`` (first two axes are x, y,
    the last is z, as in the original).

    With ``mc_passes = T > 0`` (MC dropout), the dropout layers are switched to train mode (norm layers stay in
    eval mode, so BatchNorm uses and keeps its running statistics), each window is predicted T times and its
    softmax averaged; the returned probabilities are that predictive mean ``p_bar`` and the uncertainty is its
    entropy ``U = -sum_c p_bar_c log(p_bar_c + 1e-6)`` (the training uncertainty of SPEC section 3). The passes
    draw from torch's global RNG: seed it for repeatable maps. The network's train/eval mode is restored after.

    Args:
        net: network mapping (B, C, pd, ph, pw) to logits (B, K, pd, ph, pw) or a tuple ending with them.
        image: (D, H, W) or (C, D, H, W) array or tensor.
        patch: window size (pd, ph, pw), or one int. Default (96, 96, 96).
        stride_xy: stride on the first two axes. Default 64.
        stride_z: stride on the last axis. Default 64.
        blend: ``"uniform"`` (default, the original) or ``"gaussian"``.
        batch_size: windows per forward pass. Default 1.
        tta_flip: average over the 8 mirrorings of the spatial axes. Default False.
        amp: run the network under ``torch.autocast`` (CUDA: bf16 where supported, else fp16; CPU: bf16).
            The softmax and the accumulation stay float32. Default False.
        mc_passes: number T of MC-dropout passes per window; 0 (default) = one deterministic eval-mode pass.
        device: where the network runs and the volume accumulates. Default: the device of the network's first
            parameter (CPU for a network without parameters). A network elsewhere runs as a copy moved there.

    Returns:
        ``(probabilities, uncertainty)``: (K, D, H, W) float32 on ``device``, and the (D, H, W) entropy map when
        ``mc_passes > 0``, else None.

    Raises:
        ValueError: for a malformed image, patch or stride, ``mc_passes < 0``, ``amp`` on a device other than
            cuda/cpu, or a network output that is not logits of the window's shape (see
            :func:`predict_sliding_window`).
    """
    if not isinstance(mc_passes, (int, np.integer)) or mc_passes < 0:
        raise ValueError(f"mc_passes must be a non-negative int, found {mc_passes!r}")
    if device is None:
        parameter = next(net.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device)
    autocast_dtype = _autocast_dtype(device, amp)
    tensor = _as_image_tensor(image, device)
    net = _network_for(net, device)
    predict = _window_softmax(net, device, autocast_dtype, mc_passes)
    with _prediction_modes(net, mc_dropout=mc_passes > 0):
        stride = (stride_xy, stride_xy, stride_z)
        probabilities = predict_sliding_window(predict, tensor, patch, stride, blend, batch_size, tta_flip)
    uncertainty = None
    if mc_passes > 0:
        with torch.inference_mode():
            uncertainty = -(probabilities * torch.log(probabilities + _ENTROPY_EPS)).sum(dim=0)
    return probabilities, uncertainty


def _window_softmax(net: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None,
                    mc_passes: int) -> Predictor:
    """The window predictor of :func:`sliding_window_probabilities`: float32 softmax of the segmentation logits
    (the network under autocast when ``autocast_dtype`` is set), or the mean of ``mc_passes`` of them when > 0."""

    def softmax_of(batch: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = segmentation_logits(net(batch))
        return torch.softmax(logits.float(), dim=1)

    def predict(batch: Tensor) -> Tensor:
        if mc_passes == 0:
            return softmax_of(batch)
        return torch.stack([softmax_of(batch) for _ in range(mc_passes)]).mean(dim=0)

    return predict


@contextlib.contextmanager
def _prediction_modes(net: nn.Module, mc_dropout: bool) -> Iterator[None]:
    """Eval mode, with the dropout layers on for MC dropout; every module's own mode is restored afterwards."""
    was_training = {module: module.training for module in net.modules()}
    try:
        if mc_dropout:
            _set_dropout_train(net)
        else:
            net.eval()
        yield
    finally:
        for module, training in was_training.items():
            module.training = training


def predict_volume_labels(
    net: nn.Module, image: np.ndarray | Tensor, patch: int | Sequence[int] = (96, 96, 96), stride_xy: int = 64,
    stride_z: int = 64, blend: Blend = "uniform", batch_size: int = 1, tta_flip: bool = False, amp: bool = False,
    mc_passes: int = 0, device: torch.device | str | None = None,
) -> np.ndarray:
    """Label map of a volume: argmax over classes of :func:`sliding_window_probabilities`.

    Args:
        net, image, patch, stride_xy, stride_z, blend, batch_size, tta_flip, amp, mc_passes, device: as in
            :func:`sliding_window_probabilities` (defaults: patch (96, 96, 96), strides 64, the original's
            uniform averaging, one deterministic pass).

    Returns:
        (D, H, W) uint8 numpy array of class indices (ties go to the lower class).

    Raises:
        ValueError: as :func:`sliding_window_probabilities`, or for more than 256 classes.
    """
    probabilities, _ = sliding_window_probabilities(
        net, image, patch, stride_xy, stride_z, blend, batch_size, tta_flip, amp, mc_passes, device
    )
    if probabilities.shape[0] > 256:
        raise ValueError(f"uint8 labels hold at most 256 classes, the network gave {probabilities.shape[0]}")
    return argmax_labels(probabilities).cpu().numpy()


def argmax_labels(probabilities: Tensor) -> Tensor:
    """Class labels of (K, D, H, W) scores: ``torch.argmax(probabilities, 0).to(torch.uint8)``, faster.

    The first class wins ties, as with ``torch.argmax``. One elementwise comparison per class, instead of
    ``torch.argmax``'s strided reduction over the outer axis of a large volume.

    Args:
        probabilities: (K, D, H, W) scores, K <= 256.

    Returns:
        (D, H, W) uint8 tensor on the same device.
    """
    with torch.inference_mode():
        best = probabilities[0]
        labels = torch.zeros(probabilities.shape[1:], dtype=torch.uint8, device=probabilities.device)
        for k in range(1, probabilities.shape[0]):
            better = probabilities[k] > best
            labels.masked_fill_(better, k)
            best = torch.where(better, probabilities[k], best)
        return labels


def _network_for(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` itself when it is on ``device``, else a copy of it moved there (the caller's network is never moved)."""
    if all(_same_device(t.device, device) for t in itertools.chain(net.parameters(), net.buffers())):
        return net
    return copy.deepcopy(net).to(device)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:<current>`` name the same device."""
    if a.type != b.type:
        return False
    if a.type == "cuda":
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return True
