"""Prepare the NIH Pancreas-CT release (as NIfTI) as MC-Net did, for ``--dataset pancreas`` training.

    cd code && python prepare_pancreas.py --image_dir ../data/Pancreas-CT/images \\
        --label_dir ../data/Pancreas-CT/TCIA_pancreas_labels-02-05-2017 --out_dir ../data/Pancreas

pairs ``<image_dir>/*.nii[.gz]`` (``PANCREAS_0001.nii.gz``, or ``image0001.nii.gz`` as MC-Net named them ...) with
``<label_dir>/label<NNNN>.nii[.gz]`` by the 4-digit case number (the last 4 digits of the image name), and for each
case does what MC-Net's preprocessing notebook does (ycwu1997/MC-Net, ``data/Pancreas/Pre-processing.ipynb``):

1. resample image and label to 1 mm isotropic (``--spacing``), ``int(n * s / 1 mm)`` voxels per axis as the
   notebook; the image with a cubic B-spline (``--interpolation bspline``, default: the notebook's
   ``sitk.sitkBSpline``) or linearly (``linear``), the label by nearest neighbour;
2. clip the intensities to the soft-tissue window [-125, 275] HU (``--window``; the notebook's level 75, width
   400);
3. crop around the label's bounding box, as the notebook's ``crop_roi``: on each cropped axis, with ``first`` and
   ``last`` the first and last labelled voxel, ``g = max(96 - (last - first), 0) // 2`` (``--min_size``; widens
   a narrow box to about 96 voxels) and the margin ``m = 25`` (``--margin``), the box is
   ``[max(first - g - m, 0), min(last + g + m, n))``: 25 voxels before the first labelled voxel and 24 after the
   last (the notebook's slice stop is exclusive) when no widening is needed. The notebook crops the first two
   axes (x, y) and keeps every slice of the third (z): ``--crop_axes xy`` (default); ``xyz`` crops z the same way;
4. z-score with the mean and std of the cropped volume (the notebook's ``(image - mean) / std``; its rescaling of
   the window to [0, 1] first cancels out);
5. pad any axis still shorter than 96 (a box clamped at a small volume) up to 96, centred, with the value that
   -125 HU (the window minimum, air) takes after step 4 (constant padding); the label is padded with 0. The
   notebook never pads (MC-Net's random crop pads such volumes with zeros at training time); real Pancreas-CT
   volumes are large enough that this does not happen;
6. write ``<out_dir>/Pancreas_h5/image<NNNN>_norm.h5`` (``image`` float32, ``label`` uint8, gzip) atomically.

Where we differ from the notebook: the label is stored as uint8 (the notebook stores float32); resampling is
scipy's (voxel edges aligned) rather than SimpleITK's (first voxel centres aligned), so volumes can differ by a
fraction of a voxel; padding (step 5) is ours.

The split (``--split``): ``mcnet`` (default) writes MC-Net's published ``train.list`` (62 cases) and ``test.list``
(20 cases), in their order (the labelled cases are the first ``--labeled_num`` lines of ``train.list``), keeping
the cases found; a case outside MC-Net's 82 goes to the end of ``train.list``. MC-Net's split is a fixed random
draw, not the first 62 / last 20 of the sorted case numbers. ``sorted`` puts the last ``round(n * 20 / 82)`` of
the sorted case numbers into ``test.list`` (at least one from 2 cases on; 62 / 20 for 82 cases) and the others into
``train.list``. The lists are written only when every case was prepared, so that they depend on the whole set of
cases. A bad case (no label, shapes that differ, an empty label, label values other than 0/1, an unreadable file)
is reported in one line naming the file and left out; the run then ends with exit code 1. Image and label files
whose voxel-to-world affines differ get a note (a label converted with another orientation would not overlay
the image).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from dataloaders.preprocess import CaseError, OutputError, nonzero_bbox, resample_to_shape, write_case_h5
from dataloaders.raw_datasets import run_in_workers
from utils.atomic import atomic_write_text, is_no_space_error, remove_stale_parts
from utils.cli import run_writing_into

__all__ = [
    "MCNET_TEST",
    "MCNET_TRAIN",
    "PancreasCase",
    "build_parser",
    "crop_box",
    "find_pancreas_cases",
    "main",
    "pad_to_min_size",
    "prepare_pancreas_case",
    "split_mcnet",
    "split_train_test",
]

H5_FOLDER = "Pancreas_h5"
_NUMBER_RE = re.compile(r"(\d{4})\.nii(?:\.gz)?$", re.IGNORECASE)
_LABEL_RE = re.compile(r"label(\d{4})\.nii(?:\.gz)?", re.IGNORECASE)
# MC-Net: 62 training and 20 test cases of the 82 in the release.
_MCNET_TEST, _MCNET_TOTAL = 20, 82
# MC-Net's published split, in its order (ycwu1997/MC-Net, data/Pancreas/train.list and test.list).
MCNET_TRAIN: tuple[str, ...] = tuple(f"image{n:04d}" for n in (
    57, 18, 62, 31, 20, 17, 32, 79, 61, 64, 70, 19, 48, 76, 41, 52, 49, 71, 72, 34, 10, 15, 77, 80, 27, 47, 22, 14,
    68, 58, 7, 11, 24, 42, 82, 35, 12, 55, 75, 78, 16, 13, 53, 23, 56, 33, 38, 30, 81, 29, 36, 44, 2, 45, 26, 65,
    66, 43, 28, 63, 69, 3,
))
MCNET_TEST: tuple[str, ...] = tuple(f"image{n:04d}" for n in (
    50, 59, 37, 60, 40, 74, 4, 46, 8, 54, 5, 73, 1, 39, 6, 67, 25, 51, 21, 9,
))
SPLITS = ("mcnet", "sorted")


class PancreasCase(NamedTuple):
    """One case: ``name`` ``image<NNNN>``, its image file and label file (None when missing)."""

    number: str
    image: Path
    label: Path | None

    @property
    def name(self) -> str:
        return f"image{self.number}"


def find_pancreas_cases(image_dir: Path, label_dir: Path) -> tuple[list[PancreasCase], list[str]]:
    """Pair the images with ``label<NNNN>.nii[.gz]`` by their 4-digit number, sorted by number.

    Returns:
        ``(cases, problems)``: ``problems`` are one-line messages for files that cannot be paired (a name without a
        4-digit number, a number found twice, a label without an image).

    Raises:
        FileNotFoundError: if a folder does not exist.
    """
    for folder, option in ((image_dir, "--image_dir"), (label_dir, "--label_dir")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{option} {folder} does not exist or is not a folder")
    problems: list[str] = []
    images: dict[str, Path] = {}
    for path in sorted(p for p in image_dir.iterdir() if p.name.lower().endswith((".nii", ".nii.gz"))):
        if path.name.startswith(".") or _LABEL_RE.fullmatch(path.name):  # labels may share the images' folder
            continue
        match = _NUMBER_RE.search(path.name)
        if match is None:
            problems.append(f"{path} has no 4-digit case number; expected a name like PANCREAS_0001.nii.gz")
        elif match[1] in images:
            problems.append(f"{path} has the case number {match[1]} of {images[match[1]]}; expected one image per case")
        else:
            images[match[1]] = path
    labels: dict[str, Path] = {}
    for path in sorted(label_dir.iterdir()):
        match = _LABEL_RE.fullmatch(path.name)
        if match is not None:
            labels.setdefault(match[1], path)
    for number in sorted(set(labels) - set(images)):
        problems.append(f"image{number}: {labels[number]} has no image in {image_dir}")
    cases = [PancreasCase(n, images[n], labels.get(n)) for n in sorted(images)]
    return cases, problems


def split_mcnet(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """MC-Net's published split restricted to ``names``, in its order; names it does not hold end the train list.

    Returns:
        ``(train, test)``; with the 82 cases of the release, exactly :data:`MCNET_TRAIN` and :data:`MCNET_TEST`.
    """
    present = set(names)
    train = [n for n in MCNET_TRAIN if n in present]
    test = [n for n in MCNET_TEST if n in present]
    train += sorted(present - set(MCNET_TRAIN) - set(MCNET_TEST))
    return train, test


def split_train_test(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split by case number (``--split sorted``): the last ``round(n * 20 / 82)`` sorted names are the test cases.

    82 cases give 62 / 20 (MC-Net's sizes, not its cases: see :func:`split_mcnet`); other counts keep the
    proportion, with at least one test case from 2 cases on.
    """
    names = sorted(names)
    n_test = round(len(names) * _MCNET_TEST / _MCNET_TOTAL)
    if len(names) >= 2:
        n_test = max(1, n_test)
    return names[: len(names) - n_test], names[len(names) - n_test :]


def crop_box(label: np.ndarray, axes: Sequence[int], margin: int = 25, min_size: int = 96) -> list[tuple[int, int]]:
    """The crop box ``[(start, stop), ...]`` per axis around the label's voxels, as MC-Net's ``crop_roi``.

    On each axis of ``axes``, with ``first`` / ``last`` the first / last labelled voxel and
    ``g = max(min_size - (last - first), 0) // 2``: ``start = max(first - g - margin, 0)`` and
    ``stop = min(last + g + margin, n)`` (exclusive). Other axes are kept whole.

    Raises:
        ValueError: if the label has no nonzero voxel.
    """
    bbox = nonzero_bbox(label)
    box = []
    for axis, ((first, stop), n) in enumerate(zip(bbox, label.shape)):
        if axis not in axes:
            box.append((0, n))
            continue
        last = stop - 1
        grow = max(min_size - (last - first), 0) // 2
        box.append((max(first - grow - margin, 0), min(last + grow + margin, n)))
    return box


def pad_to_min_size(array: np.ndarray, min_size: int, value: float) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Pad each axis shorter than ``min_size`` to ``min_size`` with ``value``, centred (the extra voxel after).

    Returns:
        ``(padded, [(before, after), ...])``.
    """
    widths = []
    for n in array.shape:
        extra = max(min_size - n, 0)
        widths.append((extra // 2, extra - extra // 2))
    if not any(a or b for a, b in widths):
        return array, widths
    return np.pad(array, widths, mode="constant", constant_values=value), widths


def prepare_pancreas_case(
    case: PancreasCase,
    spacing: float = 1.0,
    window: tuple[float, float] = (-125.0, 275.0),
    margin: int = 25,
    min_size: int = 96,
    crop_axes: str = "xy",
    interpolation: str = "bspline",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Resample, window, crop, z-score and pad one case (see the module docstring for each step).

    Returns:
        ``(image, label, attrs)``: ``image`` float32 (D, H, W) in the NIfTI voxel order, ``label`` uint8 0/1 of the
        same shape; ``attrs``: ``case``, ``source_files``, ``original_shape``, ``original_affine``,
        ``original_spacing``, ``resampled_shape``, ``crop_start`` / ``crop_stop_exclusive`` (in the resampled
        grid), ``pad_before`` / ``pad_after``, ``hu_window``, ``zscore_mean`` / ``zscore_std`` (of the windowed,
        cropped volume: ``image * std + mean`` gives HU back), ``pad_value``, ``shape``, ``spacing``, ``affine``
        (voxel -> world of the stored array), ``interpolation``, ``crop_axes``.

    Raises:
        CaseError: a missing label, an unreadable file, shapes that differ, an empty label, label values other
            than 0/1, NaN/inf intensities, or a constant cropped volume.
    """
    image, affine, label, label_affine = _read_checked_pair(case)
    original_shape = image.shape
    spacing_in = np.linalg.norm(affine[:3, :3], axis=0)
    image, label, resampled_shape = _resample_windowed(case, image, label, spacing_in, spacing, window, interpolation)

    axes = (0, 1) if crop_axes == "xy" else (0, 1, 2)
    box = crop_box(label, axes, margin, min_size)
    slices = tuple(slice(a, b) for a, b in box)
    image, label = image[slices].astype(np.float64), label[slices]
    mean, std = float(image.mean()), float(image.std())
    if not std > 0:
        raise CaseError(case.name, f"{case.image}: the cropped volume is constant ({mean:g} HU); cannot z-score")
    image = ((image - mean) / std).astype(np.float32)
    pad_value = (window[0] - mean) / std
    image, widths = pad_to_min_size(image, min_size, pad_value)
    label, _ = pad_to_min_size(label, min_size, 0)

    stored = _stored_affine(affine, original_shape, resampled_shape, box, widths)
    attrs: dict[str, Any] = {
        "case": case.name,
        "source_files": [case.image.name, case.label.name],  # type: ignore[union-attr]
        "original_shape": np.asarray(original_shape, dtype=np.int64),
        "original_affine": affine,
        "original_spacing": spacing_in,
        "resampled_shape": np.asarray(resampled_shape, dtype=np.int64),
        "crop_start": np.asarray([a for a, _ in box], dtype=np.int64),
        "crop_stop_exclusive": np.asarray([b for _, b in box], dtype=np.int64),
        "pad_before": np.asarray([a for a, _ in widths], dtype=np.int64),
        "pad_after": np.asarray([b for _, b in widths], dtype=np.int64),
        "hu_window": np.asarray(window, dtype=np.float64),
        "zscore_mean": mean,
        "zscore_std": std,
        "pad_value": float(pad_value),
        "shape": np.asarray(image.shape, dtype=np.int64),
        "spacing": np.linalg.norm(stored[:3, :3], axis=0),
        "affine": stored,
        "target_spacing": float(spacing),
        "interpolation": interpolation,
        "crop_axes": crop_axes,
        "axis_order": "xyz",
        "label_affine_matches": bool(np.allclose(label_affine, affine, atol=1e-3)),
    }
    return np.ascontiguousarray(image), np.ascontiguousarray(label), attrs


def _read_volume(name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine)`` of one NIfTI file, squeezed to 3-D."""
    import nibabel as nib

    try:
        img = nib.load(str(path), mmap=False)
        data = np.asarray(np.asanyarray(img.dataobj))
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as err:  # any reader error means "cannot read this file"
        raise CaseError(name, f"cannot read {path} ({type(err).__name__}: {err})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseError(name, f"{path} has shape {data.shape}; expected a 3-D volume")
    return data, affine


def _read_checked_pair(case: PancreasCase) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(image, affine, label, label_affine)`` of the case, checked: same shape, finite HU, a 0/1 nonempty label."""
    name = case.name
    if case.label is None:
        raise CaseError(name, f"{case.image} has no label; expected label{case.number}.nii.gz in the label folder")
    image, affine = _read_volume(name, case.image)
    label, label_affine = _read_volume(name, case.label)
    if image.shape != label.shape:
        raise CaseError(
            name, f"{case.label} has shape {label.shape} but {case.image} has shape {image.shape}; expected the same"
        )
    if np.issubdtype(image.dtype, np.inexact) and not np.all(np.isfinite(image)):
        raise CaseError(name, f"{case.image} has NaN/inf voxels; expected finite HU values")
    values = np.unique(label)
    if not np.any(values != 0):
        raise CaseError(name, f"{case.label} is empty (no labelled voxel); expected the pancreas labelled 1")
    if not set(values.tolist()) <= {0, 1}:
        shown = ", ".join(f"{v:g}" for v in values if v not in (0, 1))
        raise CaseError(name, f"{case.label} has values {shown}; expected 0 (background) and 1 (pancreas)")
    return image, affine, label, label_affine


def _resample_windowed(
    case: PancreasCase,
    image: np.ndarray,
    label: np.ndarray,
    spacing_in: np.ndarray,
    spacing: float,
    window: tuple[float, float],
    interpolation: str,
) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Resample image and label to ``spacing`` mm and clip the image to ``window``; with the resampled shape."""
    # int(), as the notebook; the small epsilon keeps 512 * 0.703125 mm at 360 voxels despite float noise
    resampled_shape = tuple(max(1, int(n * s / spacing + 1e-6)) for n, s in zip(image.shape, spacing_in))
    order = 3 if interpolation == "bspline" else 1
    image = resample_to_shape(np.asarray(image, dtype=np.float32), resampled_shape, order=order)
    label = resample_to_shape(label.astype(np.uint8), resampled_shape, order=0)
    image = np.clip(image, window[0], window[1])  # after resampling: B-spline overshoot is clipped too
    if not label.any():
        raise CaseError(case.name, f"{case.label} lost every labelled voxel when resampled to {spacing} mm")
    return image, label, resampled_shape


def _stored_affine(
    affine: np.ndarray,
    original_shape: tuple[int, ...],
    resampled_shape: tuple[int, ...],
    box: Sequence[tuple[int, int]],
    widths: Sequence[tuple[int, int]],
) -> np.ndarray:
    """Voxel -> world of the stored array, from the file's ``affine``, the resampling, the crop and the padding."""
    # stored voxel r -> resampled voxel s = crop_start + r - pad_before -> file voxel f * s + (f - 1) / 2
    factor = np.asarray(original_shape, dtype=np.float64) / np.asarray(resampled_shape, dtype=np.float64)
    offset = np.asarray([a for a, _ in box], dtype=np.float64) - np.asarray([b for b, _ in widths], dtype=np.float64)
    to_file = np.eye(4)
    to_file[:3, :3] = np.diag(factor)
    to_file[:3, 3] = factor * offset + (factor - 1.0) / 2.0
    return affine @ to_file


class _Outcome(NamedTuple):
    name: str
    message: str  # empty when written
    note: str = ""


def _prepare_to_h5(case: PancreasCase, out: Path, options: dict[str, Any]) -> _Outcome:
    """One case into ``<out>/image<NNNN>_norm.h5``; a bad case comes back as a one-line message."""
    try:
        image, label, attrs = prepare_pancreas_case(case, **options)
    except CaseError as err:
        return _Outcome(case.name, str(err))
    except Exception as err:  # still one line naming the case
        return _Outcome(case.name, str(CaseError(case.name, f"{type(err).__name__}: {err}")))
    path = out / f"{case.name}_norm.h5"
    try:
        write_case_h5(path, image, label, attrs)
    except OSError as err:
        if is_no_space_error(err):
            raise OutputError(f"{case.name}: no space left on device while writing {path}") from None
        raise OutputError(f"{case.name}: cannot write {path} ({(err.strerror or str(err)).lower()})") from None
    note = ""
    if not attrs["label_affine_matches"]:
        note = (
            f"{case.name}: {case.label} and {case.image} have different voxel-to-world affines; check that the label "
            "overlays the image (arrays are paired voxel by voxel)"
        )
    return _Outcome(case.name, "", note)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="NIH Pancreas-CT (NIfTI) -> <out_dir>/Pancreas_h5/image<NNNN>_norm.h5, train.list, test.list "
        "(MC-Net's preprocessing and its 62 / 20 split)",
    )
    parser.add_argument(
        "--image_dir", type=Path, required=True, help="folder of the CT volumes (PANCREAS_0001.nii.gz ...)"
    )
    parser.add_argument("--label_dir", type=Path, required=True, help="folder of the labels (label0001.nii.gz ...)")
    parser.add_argument("--out_dir", type=Path, required=True, help="output root: Pancreas_h5/, train.list, test.list")
    parser.add_argument("--spacing", type=float, default=1.0, help="isotropic voxel size in mm (default 1, as MC-Net)")
    parser.add_argument(
        "--window", type=float, nargs=2, default=(-125.0, 275.0), metavar=("LOW", "HIGH"),
        help="HU window the intensities are clipped to (default -125 275)",
    )
    parser.add_argument("--margin", type=int, default=25, help="voxels kept around the label's box (default 25)")
    parser.add_argument(
        "--min_size", type=int, default=96, help="smallest output size per axis (default 96, the patch)"
    )
    parser.add_argument(
        "--crop_axes", choices=("xy", "xyz"), default="xy",
        help="axes cropped around the label: xy (default, MC-Net: every z slice kept) or xyz",
    )
    parser.add_argument(
        "--interpolation", choices=("bspline", "linear"), default="bspline",
        help="image resampling: cubic B-spline (default, as MC-Net's SimpleITK call) or linear; labels: nearest",
    )
    parser.add_argument(
        "--split", choices=SPLITS, default="mcnet",
        help="mcnet: MC-Net's published train.list / test.list (default); sorted: the last round(n * 20 / 82) "
        "case numbers are the test cases",
    )
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the preparation; returns the exit code (0 good, 1 bad input or output, 2 bad arguments, 130 Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if not args.spacing > 0:
        parser.error(f"--spacing must be a positive number of mm, got {args.spacing}")
    if not args.window[0] < args.window[1]:
        parser.error(f"--window LOW must be below HIGH, got {args.window[0]:g} {args.window[1]:g}")
    if args.margin < 0 or args.min_size < 1:
        parser.error(f"--margin must be >= 0 and --min_size >= 1, got {args.margin} and {args.min_size}")
    try:
        cases, problems = find_pancreas_cases(args.image_dir, args.label_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not cases:
        print(f"error: no image (*.nii.gz with a 4-digit case number) found in {args.image_dir}", file=sys.stderr)
        return 1
    out = args.out_dir / H5_FOLDER
    run = functools.partial(_prepare, args, cases, problems, out)
    return run_writing_into(args.out_dir, (args.out_dir, out), run, one_line_errors=(OutputError,))


def _prepare(args: argparse.Namespace, cases: Sequence[PancreasCase], problems: Sequence[str], out: Path) -> int:
    remove_stale_parts(out)
    remove_stale_parts(args.out_dir)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    options = {
        "spacing": args.spacing, "window": tuple(args.window), "margin": args.margin, "min_size": args.min_size,
        "crop_axes": args.crop_axes, "interpolation": args.interpolation,
    }
    failed, written = [], []
    runner = run_in_workers(_prepare_to_h5, [(case, out, options) for case in cases], args.workers)
    with contextlib.closing(runner), tqdm(total=len(cases), desc="pancreas", unit="case", disable=None) as bar:
        for outcome in runner:
            bar.update(1)
            if outcome.message:
                failed.append(outcome.name)
                tqdm.write(f"error: {outcome.message}", file=sys.stderr)
            else:
                written.append(outcome.name)
            if outcome.note:
                tqdm.write(f"note: {outcome.note}", file=sys.stderr)
    print(f"{len(cases)} cases found: {len(written)} written, {len(failed)} failed; outputs in {out}")
    if failed or problems:
        print(
            f"{len(failed) + len(problems)} problem(s): train.list / test.list not written (the split depends on "
            "the whole set of cases); fix them and rerun",
            file=sys.stderr,
        )
        return 1
    train, test = split_mcnet(written) if args.split == "mcnet" else split_train_test(written)
    if args.split == "mcnet":
        outside = sorted(set(written) - set(MCNET_TRAIN) - set(MCNET_TEST))
        if outside:
            print(f"note: {len(outside)} case(s) are not in MC-Net's split and go to train.list: "
                  f"{', '.join(outside[:5])}{' ...' if len(outside) > 5 else ''}", file=sys.stderr)
        if not test:
            print("note: test.list is empty: none of MC-Net's test cases is present (--split sorted splits by "
                  "case number)", file=sys.stderr)
    atomic_write_text(args.out_dir / "train.list", "".join(f"{n}\n" for n in train))
    atomic_write_text(args.out_dir / "test.list", "".join(f"{n}\n" for n in test))
    print(f"split lists in {args.out_dir}: train.list {len(train)}, test.list {len(test)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
