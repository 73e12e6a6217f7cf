"""The metrics of a test case as the field reports them: the foreground, each class, the BraTS regions, in mm and in
voxels.

A row holds, for each region ``r`` (suffix ``""`` for the foreground ``label > 0``, ``_c<k>`` for class ``k`` when
there are more than two classes, and ``_wt`` / ``_tc`` / ``_et`` for BraTS labels 0-3 of ``--label_mode multiclass``:
WT = {1, 2, 3}, TC = {1, 3}, ET = {3}), the metrics ``dice<r>``, ``jaccard<r>``, ``hd95<r>``, ``asd<r>``, ``assd<r>``
(surface distances in mm) and, for the foreground, ``hd95_vox``, ``asd_vox``, ``assd_vox`` in voxels (the unit of the
LA and Pancreas tables). Empty masks follow ``utils.metrics`` (NaN surface distances, counted).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from utils.metrics import METRIC_NAMES, case_metrics, summarise

__all__ = ["BRATS_REGIONS", "VOXEL_METRICS", "region_masks", "score_case", "summary_metrics"]

BRATS_REGIONS: dict[str, tuple[int, ...]] = {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)}
"""BraTS regions as classes of ``make_label(..., "multiclass")`` (1 necrotic core, 2 oedema, 3 enhancing)."""

VOXEL_METRICS: tuple[str, ...] = ("hd95", "asd", "assd")
"""The surface distances also reported in voxels (``<name>_vox``)."""


def region_masks(pred: np.ndarray, gt: np.ndarray, classes: int, brats: bool) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(suffix, pred mask, gt mask)`` of every region scored (module docstring), foreground first.

    Args:
        pred: (D, H, W) predicted class labels.
        gt: (D, H, W) ground-truth class labels.
        classes: the network's number of classes C (per-class regions when C > 2).
        brats: add the BraTS regions (for a four-class BraTS label map).
    """
    regions = [("", pred > 0, gt > 0)]
    if classes > 2:
        regions += [(f"_c{k}", pred == k, gt == k) for k in range(1, classes)]
    if brats and classes == 4:
        regions += [(f"_{name}", np.isin(pred, values), np.isin(gt, values)) for name, values in BRATS_REGIONS.items()]
    return regions


def score_case(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], backend: str, classes: int,
               brats: bool = False) -> dict[str, Any]:
    """The metrics row of one case (without its name and time): every region, and the foreground in voxels.

    Args:
        pred: (D, H, W) predicted labels; gt: (D, H, W) labels; spacing: voxel size in mm.
        backend: ``"fast"`` or ``"medpy"`` (``utils.metrics.case_metrics``).
        classes: C; brats: add the BraTS regions.
    """
    row: dict[str, Any] = {}
    for suffix, pred_mask, gt_mask in region_masks(pred, gt, classes, brats):
        metrics = case_metrics(pred_mask, gt_mask, spacing=spacing, metric_backend=backend)
        if suffix == "":
            row.update(metrics)
            in_voxels = metrics if all(s == 1.0 for s in spacing) else case_metrics(
                pred_mask, gt_mask, spacing=None, metric_backend=backend)
            row.update({f"{name}_vox": in_voxels[name] for name in VOXEL_METRICS})
        else:
            row.update({f"{name}{suffix}": metrics[name] for name in METRIC_NAMES})
    return row


def metric_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every metric key of the rows, in the order of the first row (foreground metrics first)."""
    flags = {"case", "empty_pred", "empty_gt", "seconds"}
    return [key for key in rows[0] if key not in flags] if rows else list(METRIC_NAMES)


def summary_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{metric: {"mean", "std", "n_nan", "unit"}}`` over the cases for every metric column (NaNs left out, counted)."""
    out: dict[str, dict[str, Any]] = {}
    for key in metric_columns(rows):
        base = key.split("_")[0]
        flat = summarise([{base: row[key]} for row in rows])
        unit = "voxels" if key.endswith("_vox") else ("fraction" if base in ("dice", "jaccard") else "mm")
        out[key] = {"mean": flat[f"{base}_mean"], "std": flat[f"{base}_std"], "n_nan": flat[f"n_nan_{base}"],
                    "unit": unit}
    return out
