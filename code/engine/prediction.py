"""The one prediction route of validation, ``test_3D_dt.py`` and ``predict.py``: a case's labels, uncertainty and
class probabilities from the sliding window of SPEC section 4 (:mod:`utils.sliding_window`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from engine.config import default_stride
from utils.sliding_window import argmax_labels, sliding_window_probabilities
from utils.types import Shape3D

__all__ = ["SlidingWindow", "add_prediction_arguments", "predict_case", "window_from_args"]


@dataclass(frozen=True)
class SlidingWindow:
    """How a volume is predicted window by window.

    Attributes:
        patch_size: window (x, y, z). Default (96, 96, 96).
        stride_xy: stride on the first two axes; None: two thirds of the patch (64 for 96).
        stride_z: stride on the last axis; None: two thirds of the patch.
        sw_batch: windows per forward. Default 1.
        blend: ``"uniform"`` (released) or ``"gaussian"``.
        tta: average over the 8 mirrorings of the spatial axes. Default False.
        amp: mixed precision. Default False.
        mc_passes: MC-dropout passes for the uncertainty; 0 (default) = none.
    Raises:
        ValueError: for a value out of range (each message names the option).
    """

    patch_size: Shape3D = (96, 96, 96)
    stride_xy: int | None = None
    stride_z: int | None = None
    sw_batch: int = 1
    blend: str = "uniform"
    tta: bool = False
    amp: bool = False
    mc_passes: int = 0

    def __post_init__(self) -> None:
        patch = tuple(self.patch_size)
        if len(patch) != 3 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in patch):
            raise ValueError(f"--patch_size must be three positive ints, got {list(patch)}")
        object.__setattr__(self, "patch_size", tuple(int(v) for v in patch))
        for name, side in (("stride_xy", min(patch[:2])), ("stride_z", patch[2])):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, default_stride(side))
            elif not isinstance(value, (int, np.integer)) or not 1 <= value <= side:
                raise ValueError(f"--{name} must be an int in [1, {side}] (the patch side), got {value!r}")
        if self.blend not in ("uniform", "gaussian"):
            raise ValueError(f"--blend must be 'uniform' or 'gaussian', got {self.blend!r}")
        if not isinstance(self.sw_batch, (int, np.integer)) or self.sw_batch < 1:
            raise ValueError(f"--sw_batch must be a positive int, got {self.sw_batch!r}")
        if not isinstance(self.mc_passes, (int, np.integer)) or self.mc_passes < 0:
            raise ValueError(f"--mc_passes must be an int >= 0 (0 = no uncertainty), got {self.mc_passes!r}")


def add_prediction_arguments(parser: argparse.ArgumentParser) -> None:
    """The sliding-window options of ``test_3D_dt.py`` and ``predict.py`` (all of :class:`SlidingWindow` but
    ``mc_passes``, whose default differs), plus ``--device`` and ``--lcc``."""
    parser.add_argument("--patch_size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="sliding-window patch (default: 96 96 96, or the dataset's)")
    parser.add_argument("--stride_xy", type=int, default=None,
                        help="sliding-window stride on the first two axes (default: two thirds of the patch)")
    parser.add_argument("--stride_z", type=int, default=None,
                        help="sliding-window stride on the last axis (default: two thirds of the patch)")
    parser.add_argument("--sw_batch", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--blend", choices=("uniform", "gaussian"), default="uniform", help="overlap weighting")
    parser.add_argument("--tta", action="store_true", help="average over the 8 flips of the spatial axes")
    parser.add_argument("--amp", action="store_true", help="mixed precision inference")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1' ...")
    parser.add_argument("--lcc", action="store_true", help="keep only the largest connected foreground component")


def window_from_args(args: argparse.Namespace) -> SlidingWindow:
    """The :class:`SlidingWindow` of parsed arguments (see :func:`add_prediction_arguments`)."""
    patch = tuple(args.patch_size) if args.patch_size is not None else (96, 96, 96)
    return SlidingWindow(patch, args.stride_xy, args.stride_z, args.sw_batch, args.blend,
                         bool(args.tta), bool(args.amp), int(getattr(args, "mc_passes", 0)))


def predict_case(
    net: nn.Module,
    image: np.ndarray | torch.Tensor,
    window: SlidingWindow = SlidingWindow(),
    device: torch.device | str | None = None,
    uncertainty: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Label map, optional MC-dropout uncertainty and class probabilities of one volume.

    The label map is the argmax (first class on ties) of the deterministic, eval-mode sliding-window softmax, so
    the labels do not depend on whether uncertainty is asked for. With ``window.mc_passes = T > 0`` and
    ``uncertainty``, a second sliding-window run with the dropout layers on gives
    ``U = -sum_c p_bar_c log(p_bar_c + 1e-6)`` of the mean of T softmax maps.

    Args:
        net: segmentation network returning logits or a tuple holding them (``unet_3D_dt``).
        image: (D, H, W) or (C, D, H, W).
        window: the sliding-window settings.
        device: where to run; default the network's device.
        uncertainty: compute the MC-dropout map when ``window.mc_passes > 0``. Default True.

    Returns:
        ``(labels, uncertainty, probabilities)``: (D, H, W) uint8; (D, H, W) float32 or None; (K, D, H, W)
        float32 numpy arrays.
    """
    common = dict(patch=window.patch_size, stride_xy=window.stride_xy, stride_z=window.stride_z, blend=window.blend,
                  batch_size=window.sw_batch, tta_flip=window.tta, amp=window.amp, device=device)
    probabilities, _ = sliding_window_probabilities(net, image, mc_passes=0, **common)  # type: ignore[arg-type]
    if probabilities.shape[0] > 256:
        raise ValueError(f"uint8 labels hold at most 256 classes, the network gave {probabilities.shape[0]}")
    labels = argmax_labels(probabilities).cpu().numpy()
    unc = None
    if uncertainty and window.mc_passes > 0:
        _, unc_map = sliding_window_probabilities(net, image, mc_passes=window.mc_passes, **common)  # type: ignore[arg-type]
        unc = unc_map.float().cpu().numpy() if unc_map is not None else None
    return labels, unc, probabilities.cpu().numpy()

