"""Test-set evaluation: sliding-window prediction of every case, per-case metrics, summary, NIfTI outputs.

``evaluate`` is what ``test_3D_dt.py`` runs (and the training demo after training). For each case listed in
``<root>/<split>.txt`` it reads ``<root>/data/<case>.h5``, predicts the label map with the sliding window of SPEC
section 4 (:mod:`utils.sliding_window`), optionally keeps the largest connected component, scores it against the
label with :func:`utils.metrics.case_metrics` (prediction first, ground truth second) and, when an output folder
is given, writes:

- ``metrics.csv``: one row per case: ``case, dice, jaccard, hd95, asd, assd, empty_pred, empty_gt, seconds``;
- ``summary.json``: mean and std of each metric over the cases (NaNs excluded and counted), the empty-mask counts
  and the configuration of the run;
- ``<case>_pred.nii.gz`` (uint8), ``<case>_img.nii.gz`` (float32), ``<case>_gt.nii.gz`` (uint8), and with MC
  uncertainty ``<case>_unc.nii.gz`` (float32), all on the stored (cropped) grid with its voxel-to-world affine;
- with ``native=True``, ``<case>_pred_native.nii.gz`` in the original scan's grid and affine.

Every file is written atomically, and nothing else in the folder is touched: the released script deleted the
whole output folder first. The released script also saved its NIfTIs with an identity affine, losing the crop
offset; here the affine comes from the geometry attributes that ``dataloaders.preprocess`` stores in each h5.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Union

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from tqdm import tqdm

from dataloaders.brats2019 import CaseDataset
from dataloaders.case_checks import CaseFileError, check_case_file  # re-exported: they used to live here
from dataloaders.preprocess import read_case_h5, restore_to_original
from engine.prediction import SlidingWindow, add_prediction_arguments, predict_case
from engine.scoring import VOXEL_METRICS, metric_columns, score_case, summary_metrics
from utils.atomic import atomic_path, atomic_write_text
from utils.metrics import METRIC_NAMES, summarise

__all__ = [
    "CSV_COLUMNS",
    "CaseFileError",
    "EvaluationResult",
    "Outputs",
    "SlidingWindow",
    "add_prediction_arguments",
    "check_case_file",
    "evaluate",
    "format_summary_table",
    "keep_largest_component",
    "predict_case",
    "read_case",
    "save_nifti",
    "stored_geometry",
]

PathLike = Union[str, "os.PathLike[str]"]

CSV_COLUMNS: tuple[str, ...] = ("case", *METRIC_NAMES, *(f"{m}_vox" for m in VOXEL_METRICS), "empty_pred", "empty_gt",
                                 "seconds")
"""Columns of ``metrics.csv`` for two classes, in order; more classes and the BraTS regions add theirs before
``empty_pred`` (``engine.scoring``)."""

_BACKENDS = {"ours": "fast", "fast": "fast", "medpy": "medpy"}
_GEOMETRY_KEYS = ("original_shape", "original_affine", "bbox_start", "bbox_stop_exclusive", "shape")


class EvaluationResult(NamedTuple):
    """What :func:`evaluate` returns.

    Attributes:
        rows: one dict per case with the keys of :data:`CSV_COLUMNS`.
        summary: the content of ``summary.json`` (NaN written as null there, kept as NaN here).
        out_dir: the output folder, or None when nothing was written.
    """

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    out_dir: Path | None


# ------------------------------------------------------------------------------------------------- reading


def read_case(path: PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(image, label, attrs)`` of one case file; any reader error becomes a one-line :class:`CaseFileError`.

    Returns:
        ``image`` (D, H, W) or (C, D, H, W) float32, ``label`` (D, H, W) (or (K, D, H, W)), and the file's
        attributes (empty for files without geometry, such as the published BraTS2019 h5 data).

    Raises:
        CaseFileError: naming ``path``.
    """
    check_case_file(path)
    try:
        image, label, attrs = read_case_h5(path)
    except Exception as err:  # e.g. a chunk that fails to decompress
        raise CaseFileError(f"{path}: cannot read the arrays ({type(err).__name__}: {_one_line(err)})") from None
    return np.asarray(image, dtype=np.float32), np.asarray(label), attrs


def stored_geometry(attrs: Mapping[str, Any], shape: Sequence[int]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Voxel-to-world affine (4x4) and voxel size of the stored (cropped, maybe resampled) arrays of a case.

    In order of preference:

    1. the ``affine`` attribute written by ``dataloaders.preprocess.preprocess_case`` (crop offset, axis order
       and resampling already folded in);
    2. ``original_affine`` and ``bbox_start`` (plus ``bbox_stop_exclusive`` when the stored grid was resampled):
       the original affine shifted by the crop offset, ``A_orig @ [[diag(f), start + (f - 1) / 2], [0, 1]]`` with
       ``f = box size / stored size`` per axis (``f = 1`` without resampling; voxel edges aligned);
    3. nothing stored (the published h5 data): ``diag(s, s, s, 1)`` with ``s`` the ``spacing`` attribute if
       present, else 1 mm (SPEC section 1: the BraTS data is 1 mm).

    Args:
        attrs: the case file's attributes.
        shape: spatial shape (D, H, W) of the stored arrays.

    Returns:
        ``(affine, spacing)``, spacing being the column norms of the affine's 3x3 part.
    """
    shape = tuple(int(s) for s in shape)
    if "affine" in attrs:
        affine = np.asarray(attrs["affine"], dtype=np.float64).reshape(4, 4)
    elif "original_affine" in attrs and "bbox_start" in attrs:
        start = np.asarray(attrs["bbox_start"], dtype=np.float64)
        if "bbox_stop_exclusive" in attrs:
            box = np.asarray(attrs["bbox_stop_exclusive"], dtype=np.float64) - start
            factor = box / np.asarray(shape, dtype=np.float64)
        else:
            factor = np.ones(3)
        to_original = np.eye(4)
        to_original[:3, :3] = np.diag(factor)
        to_original[:3, 3] = start + (factor - 1.0) / 2.0
        affine = np.asarray(attrs["original_affine"], dtype=np.float64).reshape(4, 4) @ to_original
    else:
        spacing = np.broadcast_to(np.asarray(attrs.get("spacing", 1.0), dtype=np.float64).reshape(-1), (3,))
        affine = np.diag([*spacing, 1.0])
    spacing_out = np.linalg.norm(affine[:3, :3], axis=0)
    return affine, (float(spacing_out[0]), float(spacing_out[1]), float(spacing_out[2]))


# ------------------------------------------------------------------------------------------------ predicting


def keep_largest_component(labels: np.ndarray, connectivity: int = 3) -> np.ndarray:
    """Keep only the largest connected component of the foreground (``labels > 0``); other voxels become 0.

    Components come from ``scipy.ndimage.label`` with ``generate_binary_structure(3, connectivity)``:
    ``connectivity=3`` (default) joins voxels sharing a face, edge or corner (26-neighbourhood), 1 only faces
    (6-neighbourhood). Of equally large components the one ``ndimage.label`` numbers first is kept. Class values
    inside the kept component are unchanged; an empty foreground is returned as is.

    Args:
        labels: (D, H, W) label map (any integer or bool dtype).
        connectivity: 1, 2 or 3.

    Returns:
        A new array of ``labels``' shape and dtype.

    Raises:
        ValueError: if ``labels`` is not 3-D or ``connectivity`` is not 1, 2 or 3.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (D, H, W), found shape {labels.shape}")
    if connectivity not in (1, 2, 3):
        raise ValueError(f"connectivity must be 1, 2 or 3, found {connectivity!r}")
    components, count = ndimage.label(labels > 0, structure=ndimage.generate_binary_structure(3, connectivity))
    if count <= 1:
        return labels.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0  # background
    keep = components == int(np.argmax(sizes))
    return np.where(keep, labels, np.zeros((), dtype=labels.dtype))


# ------------------------------------------------------------------------------------------------- writing


def save_nifti(path: PathLike, array: np.ndarray, affine: np.ndarray, dtype: Any = None) -> Path:
    """Write ``array`` as a NIfTI-1 file with ``affine`` (qform and sform, code 1 = scanner), units mm, atomically.

    Args:
        path: target, ``.nii.gz`` or ``.nii``.
        array: (X, Y, Z) or (X, Y, Z, C) in voxel order.
        affine: 4x4 voxel-to-world matrix; the header's voxel sizes follow from it.
        dtype: on-disk data type (default: the array's).

    Returns:
        ``path`` as a ``Path``.
    """
    import nibabel as nib

    path = Path(path)
    array = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    image.header.set_xyzt_units("mm")
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix or ".nii.gz"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(image, str(tmp))
    return path


def _channels_last(image: np.ndarray) -> np.ndarray:
    """(C, D, H, W) -> (D, H, W, C) for NIfTI; 3-D arrays unchanged."""
    return np.moveaxis(image, 0, -1) if image.ndim == 4 else image


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``metrics.csv``: :data:`CSV_COLUMNS`, with the per-class, region and voxel metrics after the foreground's."""
    columns = ["case", *metric_columns(rows), "empty_pred", "empty_gt", "seconds"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_value(row[column]) for column in columns])
    atomic_write_text(path, buffer.getvalue())


def _csv_value(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(float(value))
    return value


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None, numpy scalars/arrays -> Python, tuples -> lists, paths -> str (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


_TABLE_ROWS = (
    ("dice", "Dice (%)", 100.0),
    ("jaccard", "Jaccard (%)", 100.0),
    ("hd95", "HD95 (mm)", 1.0),
    ("asd", "ASD (mm)", 1.0),
    ("assd", "ASSD (mm)", 1.0),
)


def format_summary_table(summary: Mapping[str, Any]) -> str:
    """The mean +- std table printed at the end of a run (Dice and Jaccard in %, distances in mm = voxels at 1 mm).

    Args:
        summary: :func:`evaluate`'s summary (its ``"metrics"`` entry holds ``mean``, ``std``, ``n_nan`` per metric).
    """
    metrics = summary["metrics"]
    lines = [f"{'metric':<12} {'mean':>8}    {'std':>7}  {'NaN':>4}"]
    for key, name, scale in _TABLE_ROWS:
        if key not in metrics:
            continue
        mean, std = metrics[key]["mean"], metrics[key]["std"]
        mean = math.nan if mean is None else mean * scale
        std = math.nan if std is None else std * scale
        lines.append(f"{name:<12} {mean:>8.2f} +- {std:>7.2f}  {metrics[key]['n_nan']:>4d}")
    lines.append(
        f"{summary['n_cases']} cases; empty prediction: {summary['n_empty_pred']}, empty label: {summary['n_empty_gt']}"
        " (surface distances of a case with an empty mask are NaN and left out of their mean)"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Outputs:
    """What :func:`evaluate` writes per case besides the metrics.

    Attributes:
        nifti: ``<case>_{pred,img,gt}.nii.gz`` (and ``_unc`` with MC passes). Default True.
        native: ``<case>_pred_native.nii.gz`` in the original scan's grid and affine. Default False.
        overlay_png: ``<case>_overlay.png``. Default False.
    """

    nifti: bool = True
    native: bool = False
    overlay_png: bool = False


class _Case(NamedTuple):
    name: str
    image: np.ndarray
    label: np.ndarray
    attrs: dict[str, Any]


def _read(dataset: CaseDataset, name: str) -> _Case:
    image, label, attrs = read_case(dataset.path_of(name))
    if dataset.layout.spacing is not None and not any(k in attrs for k in ("affine", "original_affine", "spacing")):
        attrs = {**attrs, "spacing": np.asarray(dataset.layout.spacing)}  # the layout's known voxel size
    return _Case(name, image, label, attrs)


def _score(case: _Case, pred: np.ndarray, seconds: float, backend: str, classes: int, brats: bool) -> dict[str, Any]:
    """The metrics row of a case (``engine.scoring``): foreground, classes and regions, prediction first."""
    gt = case.label[0] if case.label.ndim == 4 else case.label
    _, spacing = stored_geometry(case.attrs, gt.shape)
    row: dict[str, Any] = {"case": case.name, **score_case(pred, gt, spacing, backend, classes, brats)}
    row["seconds"] = round(seconds, 3)
    return row


def _write(out: Path, case: _Case, pred: np.ndarray, uncertainty: np.ndarray | None, row: Mapping[str, Any],
           outputs: Outputs) -> bool:
    """The case's NIfTI / PNG files; returns False when ``native`` was asked for but the file lacks the geometry."""
    gt = case.label[0] if case.label.ndim == 4 else case.label
    affine, _ = stored_geometry(case.attrs, gt.shape)
    name = case.name
    if outputs.nifti:
        save_nifti(out / f"{name}_pred.nii.gz", pred, affine, np.uint8)
        save_nifti(out / f"{name}_img.nii.gz", _channels_last(case.image), affine, np.float32)
        save_nifti(out / f"{name}_gt.nii.gz", _channels_last(case.label), affine, np.uint8)
        if uncertainty is not None:
            save_nifti(out / f"{name}_unc.nii.gz", uncertainty, affine, np.float32)
    if outputs.overlay_png:
        from utils.visualize import save_overlay_png

        save_overlay_png(out / f"{name}_overlay.png", case.image, gt, pred, uncertainty,
                         title=f"{name}  Dice {row['dice'] * 100:.2f} %")
    if not outputs.native:
        return True
    if not all(key in case.attrs for key in _GEOMETRY_KEYS):
        return False
    restored = restore_to_original(pred, case.attrs)
    save_nifti(out / f"{name}_pred_native.nii.gz", restored, case.attrs["original_affine"], np.uint8)
    return True


def _summary(rows: list[dict[str, Any]], settings: dict[str, Any], native_skipped: int, seconds: float) -> dict[str, Any]:
    flat = summarise(rows)
    return {
        "n_cases": flat["n_cases"],
        "metrics": summary_metrics(rows),
        "n_empty_pred": flat.get("n_empty_pred", 0),
        "n_empty_gt": flat.get("n_empty_gt", 0),
        "n_native_skipped": native_skipped,
        "units": {"dice": "fraction", "jaccard": "fraction", "hd95": "mm", "asd": "mm", "assd": "mm",
                  "<metric>_vox": "voxels"},
        "definitions": (
            "metrics of (prediction, ground truth) in that order; HD95 pools both directed surface-distance sets "
            "(medpy); ASD is directed prediction -> ground truth, ASSD symmetric; a case with an empty prediction "
            "or label has NaN surface distances, excluded from the mean and counted in n_nan"
        ),
        "seconds_total": round(seconds, 3),
        "config": settings,
    }


def _open_cases(root_path: PathLike, split: str, layout: str, split_dir: PathLike | None) -> tuple[CaseDataset, list[str]]:
    """The split's dataset and case names, every case file checked before the first prediction."""
    dataset = CaseDataset(root_path, split, layout=layout, split_dir=split_dir)  # the list and every file exist
    names = list(dataset.image_list)
    if not names:
        raise ValueError(f"{dataset.layout.split_path(root_path, split, split_dir)} lists no case")
    for name in names:
        check_case_file(dataset.path_of(name))
    return dataset, names


def evaluate(
    net: nn.Module,
    root_path: PathLike,
    out_dir: PathLike | None = None,
    *,
    window: SlidingWindow = SlidingWindow(),
    split: str = "test",
    dataset: str = "brats2019",
    split_dir: PathLike | None = None,
    device: torch.device | str | None = None,
    lcc: bool = False,
    metric_backend: str = "fast",
    outputs: Outputs = Outputs(),
    around_case: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    config: Mapping[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Predict and score every case of the ``split`` list; write the results into ``out_dir``.

    Per case, in order: read, predict (:func:`engine.prediction.predict_case`), post-process (``lcc``), score
    (``engine.scoring``: foreground, classes, BraTS regions, in the voxel size of :func:`stored_geometry` and in
    voxels), write. Empty masks never stop the run: their surface distances are NaN, left out of the means, counted.

    Args:
        net: the network, moved to ``device`` when one is given.
        root_path: the dataset's folder.
        out_dir: output folder (created; only the files named in the module docstring are written, existing
            files with other names are never touched). None writes nothing.
        window: the sliding-window settings (``mc_passes`` > 0 adds the uncertainty maps).
        split: split list name. Default ``"test"``.
        dataset: the layout (``dataloaders.datasets``). Default ``"brats2019"``.
        split_dir: folder of the split lists, when not ``root_path``.
        device: where to run; default the network's device.
        lcc: keep only the largest connected foreground component (:func:`keep_largest_component`). Default False.
        metric_backend: ``"fast"`` (alias ``"ours"``, default) or ``"medpy"``.
        outputs: which files to write per case (:class:`Outputs`); cases whose file lacks the geometry for
            ``native`` are skipped with a note and counted (``n_native_skipped``).
        around_case: a context manager factory entered around each case's prediction (``speed.InferenceSpeed``).
        config: the run's settings, stored under ``"config"`` in ``summary.json`` with the arguments of this call.
        progress: show a tqdm bar per case on stderr. Default True.
        log: where notes go (default: a line on stderr).

    Returns:
        :class:`EvaluationResult`.

    Raises:
        FileNotFoundError: if the split list or a listed case file is missing.
        CaseFileError: for a case file that is not readable ``image``/``label`` HDF5 (checked for all cases
            before the first prediction).
        ValueError: for an invalid ``metric_backend`` (checked before any prediction).
    """
    log = log if log is not None else (lambda message: print(message, file=sys.stderr))
    backend = _BACKENDS.get(str(metric_backend))
    if backend is None:
        raise ValueError(f"--metric_backend must be one of {sorted(_BACKENDS)}, got {metric_backend!r}")
    if device is not None:
        device = torch.device(device)
        net.to(device)
    cases, names = _open_cases(root_path, split, dataset, split_dir)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    settings = _run_settings(root_path, split, window, device if device is not None else _net_device(net), lcc,
                             outputs, backend, config)
    started = time.perf_counter()
    bar = tqdm(names, desc=f"test ({split})", unit="case", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    rows, native_skipped = _run_cases(net, cases, bar, out, window, device, lcc, backend, outputs, around_case)
    if native_skipped:
        log(f"note: --native skipped {len(native_skipped)} case(s) whose h5 has no geometry attributes "
            f"(written by an older preprocessing), e.g. {native_skipped[0]}; re-run preprocess_brats2019.py")
    summary = _summary(rows, settings, len(native_skipped), time.perf_counter() - started)
    if out is not None:
        _write_csv(out / "metrics.csv", rows)
        atomic_write_text(out / "summary.json", json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n")
    return EvaluationResult(rows, summary, out)


def _run_cases(
    net: nn.Module, dataset: CaseDataset, bar: tqdm, out: Path | None, window: SlidingWindow,
    device: torch.device | str | None, lcc: bool, backend: str, outputs: Outputs,
    around_case: Callable[[], AbstractContextManager[Any]],
) -> tuple[list[dict[str, Any]], list[str]]:
    """Read, predict, post-process, score and write each case of ``bar`` in turn (:func:`evaluate`).

    Returns:
        The metrics rows, and the cases whose ``native`` file was skipped for lack of geometry.
    """
    rows: list[dict[str, Any]] = []
    native_skipped: list[str] = []
    for name in bar:
        case = _read(dataset, name)
        tic = time.perf_counter()
        with around_case():
            pred, uncertainty, probabilities = predict_case(net, case.image, window, device)
        if lcc:
            pred = keep_largest_component(pred)
        brats = dataset.layout.name == "brats2019"
        rows.append(_score(case, pred, time.perf_counter() - tic, backend, probabilities.shape[0], brats))
        bar.set_postfix(dice=f"{rows[-1]['dice']:.4f}")
        if out is not None and not _write(out, case, pred, uncertainty, rows[-1], outputs):
            native_skipped.append(name)
    bar.close()
    return rows, native_skipped


def _run_settings(root_path: PathLike, split: str, window: SlidingWindow, device: torch.device | str, lcc: bool,
                  outputs: Outputs, backend: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``"config"`` of ``summary.json``: the arguments of :func:`evaluate`, then the caller's ``config``."""
    return {"root_path": os.fspath(root_path), "split": split, **dataclasses.asdict(window),
            "patch_size": list(window.patch_size), "device": str(device), "lcc": lcc, "native": outputs.native,
            "metric_backend": backend, "save_nifti": outputs.nifti, **dict(config or {})}


def _net_device(net: nn.Module) -> torch.device:
    parameter = next(net.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _one_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
