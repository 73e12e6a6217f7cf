"""Quick-look PNGs of a case: FLAIR slice, label and prediction overlays, uncertainty map.

Drawn with matplotlib's Agg canvas directly (no ``pyplot`` state, no display needed), so it works on headless
machines and inside training loops.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np

from utils.atomic import atomic_path

__all__ = ["largest_cross_section", "save_overlay_png"]

PathLike = Union[str, "os.PathLike[str]"]

_LABEL_COLOUR = (0.0, 0.9, 0.0)  # green: ground truth
_PRED_COLOUR = (1.0, 0.15, 0.1)  # red: prediction
_ALPHA = 0.45


def largest_cross_section(mask: np.ndarray, axis: int = 2) -> int | None:
    """Index of the slice along ``axis`` with the most foreground voxels (the first one on a tie).

    Args:
        mask: (D, H, W); nonzero = foreground.
        axis: 0, 1 or 2.

    Returns:
        The slice index, or None when ``mask`` is empty.

    Raises:
        ValueError: if ``mask`` is not 3-D or ``axis`` is not 0, 1 or 2.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be (D, H, W), found shape {mask.shape}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, found {axis!r}")
    areas = np.count_nonzero(mask, axis=tuple(a for a in range(3) if a != axis))
    if not areas.any():
        return None
    return int(np.argmax(areas))


def _overlay(ax: object, background: np.ndarray, mask: np.ndarray, colour: tuple[float, float, float]) -> None:
    rgba = np.zeros(mask.shape + (4,), dtype=np.float32)
    rgba[mask] = (*colour, _ALPHA)
    ax.imshow(background, cmap="gray", interpolation="nearest")  # type: ignore[attr-defined]
    ax.imshow(rgba, interpolation="nearest")  # type: ignore[attr-defined]


def save_overlay_png(
    path: PathLike,
    image: np.ndarray,
    label: np.ndarray | None,
    pred: np.ndarray,
    uncertainty: np.ndarray | None = None,
    axis: int = 2,
    index: int | None = None,
    panel_inches: float = 3.0,
    dpi: int = 100,
    title: str | None = None,
) -> Path:
    """Write a row of panels through one slice: FLAIR | label overlay | prediction overlay | uncertainty.

    The slice is ``index`` along ``axis``; by default the one with the largest tumour cross-section of the label
    (of the prediction when the label is empty or None; the middle slice when both are empty). Each 2-D slice is
    shown transposed, so the first remaining array axis runs left to right. The figure is exactly
    ``(n_panels * panel_inches * dpi) x (panel_inches * dpi)`` pixels (no tight bounding box), with 4 panels
    when ``uncertainty`` is given and 3 otherwise (one fewer when ``label`` is None). Written atomically.

    Args:
        path: target ``.png`` file; its folder is created.
        image: (D, H, W) intensities, or (C, D, H, W) (channel 0 is shown).
        label: (D, H, W) ground truth (nonzero = tumour), or None.
        pred: (D, H, W) prediction (nonzero = tumour).
        uncertainty: (D, H, W) voxel-wise uncertainty (e.g. entropy, shown with a colour bar), or None.
        axis: slicing axis, 0, 1 or 2 (default 2: axial for BraTS arrays in (x, y, z) order).
        index: slice index; None picks the largest tumour cross-section.
        panel_inches: side of each square panel in inches (default 3).
        dpi: dots per inch (default 100).
        title: optional figure title (e.g. the case name and Dice).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: on shapes that differ or are not 3-D, an ``axis`` other than 0/1/2, an ``index`` outside the
            volume, or a non-positive size.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = _checked_image(image, label, pred, uncertainty, axis, panel_inches, dpi)
    pred_mask = np.asarray(pred) != 0
    label_mask = np.asarray(label) != 0 if label is not None else None
    if index is None:
        index = _default_slice(label_mask, pred_mask, image.shape[axis], axis)
    if not 0 <= index < image.shape[axis]:
        raise ValueError(f"index {index} is outside the volume's {image.shape[axis]} slices along axis {axis}")

    def cut(volume: np.ndarray) -> np.ndarray:
        return np.take(volume, index, axis=axis).T

    background = cut(image.astype(np.float32))
    panels: list[tuple[str, object]] = [("FLAIR", None)]
    if label_mask is not None:
        panels.append(("label", cut(label_mask)))
    panels.append(("prediction", cut(pred_mask)))
    if uncertainty is not None:
        panels.append(("uncertainty", cut(np.asarray(uncertainty, dtype=np.float32))))

    fig = Figure(figsize=(panel_inches * len(panels), panel_inches), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, data) in zip(axes, panels):
        _draw_panel(fig, ax, name, data, background)
        ax.set_title(f"{name} (axis {axis}, slice {index})" if name == "FLAIR" else name, fontsize=8)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _checked_image(
    image: np.ndarray, label: np.ndarray | None, pred: np.ndarray, uncertainty: np.ndarray | None, axis: int,
    panel_inches: float, dpi: int,
) -> np.ndarray:
    """The (D, H, W) image shown (channel 0 of a 4-D one), once the arguments of :func:`save_overlay_png` are checked."""
    image = np.asarray(image)
    if image.ndim == 4:
        image = image[0]
    if image.ndim != 3:
        raise ValueError(f"image must be (D, H, W) or (C, D, H, W), found shape {image.shape}")
    volumes = {"pred": pred, "label": label, "uncertainty": uncertainty}
    for name, volume in volumes.items():
        if volume is not None and np.asarray(volume).shape != image.shape:
            raise ValueError(f"{name} has shape {np.asarray(volume).shape}, expected the image shape {image.shape}")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, found {axis!r}")
    if not (panel_inches > 0 and dpi > 0):
        raise ValueError(f"panel_inches and dpi must be positive, found {panel_inches!r} and {dpi!r}")
    return image


def _default_slice(label_mask: np.ndarray | None, pred_mask: np.ndarray, slices: int, axis: int) -> int:
    """The largest cross-section of the label, else of the prediction, else the middle of the ``slices``."""
    index = largest_cross_section(label_mask, axis) if label_mask is not None else None
    if index is None:
        index = largest_cross_section(pred_mask, axis)
    if index is None:
        index = slices // 2
    return index


def _draw_panel(fig: object, ax: object, name: str, data: object, background: np.ndarray) -> None:
    """One panel: the FLAIR slice, an overlay of the label or the prediction, or the uncertainty with a colour bar."""
    if name == "FLAIR":
        ax.imshow(background, cmap="gray", interpolation="nearest")  # type: ignore[attr-defined]
    elif name == "uncertainty":
        shown = ax.imshow(data, cmap="magma", interpolation="nearest")  # type: ignore[attr-defined]
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)  # type: ignore[attr-defined]
    else:
        colour = _LABEL_COLOUR if name == "label" else _PRED_COLOUR
        _overlay(ax, background, np.asarray(data), colour)
