"""Raw BraTS release -> one HDF5 file per case (SPEC section 1).

The pipeline, per case, as the published BraTS2019 h5 data was made (SSL4MIS ``brats_proprecessing.py``):

1. read the chosen modalities (FLAIR only by default) and the ``_seg`` label map;
2. crop image and label to the bounding box of ``image != 0`` (:func:`crop_to_nonzero`);
3. clip intensities above the 99.9th percentile, then z-score with the mean and std of the voxels > 0
   (:func:`normalise_intensity`), each modality on its own;
4. label = 1 where seg > 0 (whole tumour, ``label_mode="wt"``), or the ``regions`` / ``multiclass`` variants;
5. optionally resample to an isotropic ``spacing`` (not in the original; geometry is recorded so predictions
   map back, see :func:`restore_to_original`);
6. write ``<root>/data/<case>.h5`` atomically with datasets ``image`` (float32) and ``label`` (uint8).

Where we differ from the released script, on purpose:

- **Inclusive bounding box.** The original slices ``[min:max)`` with ``max`` the index of the last brain voxel,
  so it drops the last brain slice on every axis. We keep it: the box is ``[first, last + 1)``.
- **Every tumour voxel must lie in the box.** The original silently crops away labels outside the brain box;
  we refuse such a case (it never happens in the BraTS releases we checked) so that
  :func:`restore_to_original` reproduces the label volume exactly.

Where we keep the released behaviour, and why it may surprise:

- The 99.9th percentile is taken over the **whole cropped volume**, zero background inside the box included
  (the original uses ``skimage.exposure.cumulative_distribution`` on the cropped array): the clip value is the
  smallest intensity ``v`` with at least 99.9 % of the voxels ``<= v``.
  ``clip_over="brain"`` takes it over the voxels > 0 only. Only the upper side is clipped.
- The z-score statistics come from the voxels > 0 but are applied to the **whole** volume, so the background
  becomes ``-mean / std`` (not 0), exactly as in the published data.
- **Axis order.** Arrays are stored in nibabel's ``(x, y, z)`` voxel order by default, the project's ``Shape3D``
  convention. The released script read the files with SimpleITK, whose arrays are ``(z, y, x)``;
  ``axis_order="zyx"`` stores that order instead (a plain transpose; the geometry attributes account for it).

Every problem with a case raises :class:`CaseError`, a one-line ``ValueError`` that starts with the case name.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, Tuple, Union

import h5py
import numpy as np

from utils.atomic import atomic_path, atomic_write_bytes, atomic_write_text, is_no_space_error

__all__ = [
    "resample_case_file",
    "resample_labels",
    "resample_to_shape",
    "BRATS_LABELS",
    "LABEL_MODES",
    "MODALITIES",
    "SPLIT_MANIFEST",
    "SPLIT_NAMES",
    "BBox",
    "CaseError",
    "CaseFiles",
    "CaseResult",
    "OutputError",
    "PreprocessOptions",
    "crop_to_nonzero",
    "find_cases",
    "is_valid_h5",
    "make_label",
    "make_splits",
    "nonzero_bbox",
    "normalise_intensity",
    "preprocess_case",
    "process_case_to_h5",
    "read_case_h5",
    "read_h5_attrs",
    "restore_to_original",
    "split_sizes",
    "try_process_case",
    "write_case_h5",
]

PathLike = Union[str, "os.PathLike[str]"]
Modality = Literal["flair", "t1", "t1ce", "t2"]
LabelMode = Literal["wt", "regions", "multiclass"]
ClipOver = Literal["volume", "brain"]
AxisOrder = Literal["xyz", "zyx"]
BBox = Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]
"""Per axis ``(start, stop)``: ``start`` is the first brain voxel, ``stop`` is one past the last (slice style)."""

MODALITIES: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
LABEL_MODES: tuple[str, ...] = ("wt", "regions", "multiclass")
BRATS_LABELS: tuple[int, ...] = (0, 1, 2, 4)
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
SPLIT_MANIFEST = "split_manifest.json"
"""Written by :func:`make_splits` beside the lists it made: the cases and seed they come from, and their content."""
FORMAT_VERSION = 1

# The published BraTS2019 split: 250 train / 25 val / 60 test of 335 cases.
_SPLIT_REFERENCE = {"train": 250, "val": 25, "test": 60}
_SPLIT_TOTAL = sum(_SPLIT_REFERENCE.values())
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_FILE_KEYS = (*MODALITIES, "seg")


class CaseError(ValueError):
    """A problem with one case; the message is one line and starts with the case name."""

    def __init__(self, case: str, problem: str) -> None:
        self.case = case
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{case}: {self.problem}")


@dataclass(frozen=True)
class CaseFiles:
    """The files of one raw case folder ``<case>/<case>_{flair,t1,t1ce,t2,seg}.nii[.gz]``.

    Attributes:
        name: case name, e.g. ``BraTS19_2013_0_1``.
        folder: the case folder.
        images: modality -> file, only for the modalities present.
        seg: the label map, or None when absent.
    """

    name: str
    folder: Path
    images: Mapping[str, Path]
    seg: Path | None


class OutputError(OSError):
    """The output of a case cannot be written (disk full, read-only or forbidden folder); one line naming it.

    Unlike a :class:`CaseError`, this concerns every case that follows, so a run stops at the first one.
    """


class CaseResult(NamedTuple):
    """Outcome of :func:`try_process_case`: ``status`` is ``"written"``, ``"skipped"`` or ``"failed"``."""

    name: str
    status: str
    message: str


@dataclass(frozen=True)
class PreprocessOptions:
    """Everything that decides the content of an output h5; checked once here.

    Args:
        modalities: modalities stacked as channels, in this order (default FLAIR only, as published).
        label_mode: ``"wt"`` (seg > 0 -> 1, default), ``"regions"`` (3 channels WT/TC/ET) or ``"multiclass"``
            (0/1/2/3, with BraTS label 4 -> 3).
        spacing: isotropic target voxel size in mm, or None (default) to keep the original grid.
        percentile: upper clipping percentile (default 99.9).
        clip_over: ``"volume"`` (default, released) or ``"brain"``: which voxels the percentile is taken over.
        axis_order: ``"xyz"`` (default, nibabel order) or ``"zyx"`` (SimpleITK order of the released script).

    Raises:
        ValueError: on an unknown or repeated modality, an unknown mode, or a non-positive spacing.
    """

    modalities: tuple[str, ...] = ("flair",)
    label_mode: str = "wt"
    spacing: float | None = None
    percentile: float = 99.9
    clip_over: str = "volume"
    axis_order: str = "xyz"

    def __post_init__(self) -> None:
        modalities = tuple(self.modalities) if not isinstance(self.modalities, str) else (self.modalities,)
        object.__setattr__(self, "modalities", modalities)
        if not modalities:
            raise ValueError(f"modalities must name at least one of {MODALITIES}, got none")
        unknown = [m for m in modalities if m not in MODALITIES]
        if unknown:
            raise ValueError(f"modalities must be among {MODALITIES}, got {unknown}")
        if len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must not repeat, got {list(modalities)}")
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {self.label_mode!r}")
        if self.spacing is not None:
            spacing = float(self.spacing)
            if not (math.isfinite(spacing) and spacing > 0):
                raise ValueError(f"spacing must be a positive number of mm or None, got {self.spacing!r}")
            object.__setattr__(self, "spacing", spacing)
        if not 0 < float(self.percentile) <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile!r}")
        if self.clip_over not in ("volume", "brain"):
            raise ValueError(f"clip_over must be 'volume' or 'brain', got {self.clip_over!r}")
        if self.axis_order not in ("xyz", "zyx"):
            raise ValueError(f"axis_order must be 'xyz' or 'zyx', got {self.axis_order!r}")


# ----------------------------------------------------------------------------------------------------- discovery


def find_cases(raw_dir: PathLike) -> list[CaseFiles]:
    """Find every case folder below ``raw_dir``, sorted by case name.

    A case folder is any folder ``<case>`` holding at least one ``<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` (or
    ``.nii``), at any depth: flat (``raw/<case>/``) or nested like the release
    (``MICCAI_BraTS_2019_Data_Training/{HGG,LGG}/<case>/``). Any BraTS prefix works (``Brats18_``, ``BraTS19_``,
    ``BraTS20_Training_``, ``BraTS2021_``). Missing modalities are not an error here: :func:`preprocess_case`
    reports them per case.

    Raises:
        FileNotFoundError: if ``raw_dir`` is not a folder.
        ValueError: if two folders carry the same case name, or a folder has both ``.nii`` and ``.nii.gz`` of a file.
    """
    root = Path(raw_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"raw data folder {root} does not exist or is not a folder")
    found: dict[str, CaseFiles] = {}
    visited: set[str] = set()
    for folder, dirnames, filenames in os.walk(root, followlinks=True):  # linked case folders are common
        real = os.path.realpath(folder)
        if real in visited:  # a link loop, or the same folder linked twice
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder_path = Path(folder)
        files = _case_files_in(folder_path, filenames)
        if not files:
            continue
        name = folder_path.name
        if name in found:
            raise ValueError(f"case name {name!r} found twice: {found[name].folder} and {folder_path}")
        seg = files.pop("seg", None)
        found[name] = CaseFiles(name=name, folder=folder_path, images=files, seg=seg)
    return [found[name] for name in sorted(found)]


def _case_files_in(folder: Path, filenames: Sequence[str]) -> dict[str, Path]:
    """Map ``flair``/``t1``/``t1ce``/``t2``/``seg`` to the files named ``<folder name>_<key>.nii[.gz]``."""
    prefix = folder.name + "_"
    files: dict[str, Path] = {}
    for filename in sorted(filenames):
        if not filename.startswith(prefix):
            continue
        rest = filename[len(prefix) :]
        suffix = next((s for s in _NIFTI_SUFFIXES if rest.lower().endswith(s)), None)
        if suffix is None:
            continue
        key = rest[: -len(suffix)].lower()
        if key not in _FILE_KEYS:
            continue
        if key in files:
            raise ValueError(f"{folder}: both {files[key].name} and {filename} exist; keep one")
        files[key] = folder / filename
    return files


# ------------------------------------------------------------------------------------------------ array steps


def nonzero_bbox(image: np.ndarray) -> BBox:
    """Inclusive bounding box of ``image != 0`` over the last three axes (and over all channels).

    Args:
        image: (D, H, W) or (C, D, H, W).

    Returns:
        ``((start, stop), ...)`` per spatial axis, with ``image[..., start:stop, ...]`` holding every nonzero voxel:
        ``stop - 1`` is the index of the last one. (The original used the last index itself as ``stop`` and lost it.)

    Raises:
        ValueError: if ``image`` is not 3-D or 4-D, or has no nonzero voxel.
    """
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be (D, H, W) or (C, D, H, W), got shape {image.shape}")
    mask = image != 0
    if mask.ndim == 4:
        mask = mask.any(axis=0)
    box = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if hits.size == 0:
            raise ValueError(f"image of shape {image.shape} has no nonzero voxel")
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return (box[0], box[1], box[2])


def crop_to_nonzero(image: np.ndarray) -> tuple[np.ndarray, BBox]:
    """Crop to the inclusive bounding box of ``image != 0`` (see :func:`nonzero_bbox`).

    Args:
        image: (D, H, W) or (C, D, H, W); for several channels the box covers any channel's nonzero voxels.

    Returns:
        ``(cropped, bbox)``, ``cropped`` a view of ``image`` of shape (..., stop - start per axis).

    Raises:
        ValueError: if ``image`` has no nonzero voxel.
    """
    bbox = nonzero_bbox(image)
    return image[(..., *_slices(bbox))], bbox


def _slices(bbox: BBox) -> tuple[slice, slice, slice]:
    return tuple(slice(start, stop) for start, stop in bbox)  # type: ignore[return-value]


def normalise_intensity(image: np.ndarray, percentile: float = 99.9, clip_over: ClipOver = "volume") -> np.ndarray:
    """Clip above a percentile, then z-score with the statistics of the voxels > 0 (as the published data).

    .. math::

        v = \\min\\{x : |\\{i : I_i \\le x\\}| \\ge p / 100 \\cdot N\\}, \\qquad
        J = \\min(I, v), \\qquad
        \\mathrm{out} = (J - \\mu) / \\sigma, \\quad \\mu, \\sigma = \\mathrm{mean}, \\mathrm{std}(J_i : J_i > 0)

    The percentile ``v`` ranks the ``N`` voxels of the whole array (``clip_over="volume"``, default: released
    behaviour, zero background included) or only the voxels > 0 (``clip_over="brain"``). ``sigma`` is the
    population std (ddof 0). The z-score applies to every voxel, so the background becomes ``-mu / sigma``.

    Args:
        image: one modality, any shape, any real dtype.
        percentile: upper clipping percentile in (0, 100] (default 99.9).
        clip_over: ``"volume"`` (default) or ``"brain"``.

    Returns:
        float32 array of ``image``'s shape.

    Raises:
        ValueError: if no voxel is > 0 after clipping, or their std is 0 (a constant brain).
    """
    if clip_over not in ("volume", "brain"):
        raise ValueError(f"clip_over must be 'volume' or 'brain', got {clip_over!r}")
    values = np.asarray(image, dtype=np.float64)
    ranked = values if clip_over == "volume" else values[values > 0]
    if ranked.size == 0:
        raise ValueError("no voxel > 0 to normalise with")
    clip_max = _lower_percentile(ranked, percentile)
    clipped = np.minimum(values, clip_max)
    brain = clipped[clipped > 0]
    if brain.size == 0:
        raise ValueError(f"no voxel > 0 left after clipping at the {percentile}th percentile ({clip_max:g})")
    mean = float(brain.mean())
    std = float(brain.std())
    if not std > 0:
        raise ValueError(f"the {brain.size} voxels > 0 all have the value {mean:g} (std 0), cannot z-score")
    return ((clipped - mean) / std).astype(np.float32)


def _lower_percentile(values: np.ndarray, percentile: float) -> float:
    """Smallest value ``v`` with at least ``percentile`` % of ``values`` ``<= v``.

    The rank ``ceil(p * N)`` is computed with exact fractions: ``numpy.percentile(method="inverted_cdf")`` computes
    ``0.999 * N`` in floating point and picks the next value whenever that product is a whole number
    (``99.9 / 100 * 8000 = 7992.000000000001``), unlike ``skimage.exposure.cumulative_distribution``.
    """
    flat = values.ravel()
    fraction = Fraction(repr(float(percentile))) / 100
    index = max(0, math.ceil(fraction * flat.size) - 1)
    return float(np.partition(flat, index)[index])


def make_label(seg: np.ndarray, label_mode: LabelMode = "wt") -> np.ndarray:
    """BraTS labels {0, 1, 2, 4} -> training target, uint8.

    Args:
        seg: (D, H, W) BraTS label map (0 background, 1 necrotic/non-enhancing core, 2 oedema, 4 enhancing).
        label_mode: ``"wt"`` (default): (D, H, W), 1 where seg > 0 (whole tumour). ``"regions"``: (3, D, H, W),
            channels WT = {1, 2, 4}, TC = {1, 4}, ET = {4}. ``"multiclass"``: (D, H, W), 0/1/2/3 with 4 -> 3.

    Raises:
        ValueError: on an unknown ``label_mode``.
    """
    if label_mode == "wt":
        return (seg > 0).astype(np.uint8)
    if label_mode == "regions":
        return np.stack([seg > 0, (seg == 1) | (seg == 4), seg == 4]).astype(np.uint8)
    if label_mode == "multiclass":
        out = seg.astype(np.uint8)
        out[seg == 4] = 3
        return out
    raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")


def resample_to_shape(array: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Resize the last three axes to ``shape``, voxel edges aligned (``scipy.ndimage.zoom(grid_mode=True)``).

    Args:
        array: (D, H, W) or (C, D, H, W).
        shape: target spatial shape.
        order: spline order: 0 (nearest, labels), 1 (linear, images), 3 (cubic B-spline).
    Returns:
        a new array (a copy when the shape is already ``shape``).
    """
    from scipy import ndimage

    shape = tuple(int(s) for s in shape)
    if tuple(array.shape[-3:]) == shape:
        return array.copy()
    factors = (1.0,) * (array.ndim - 3) + tuple(out / old for out, old in zip(shape, array.shape[-3:]))
    out = ndimage.zoom(array, factors, order=order, mode="nearest", grid_mode=True)
    if tuple(out.shape[-3:]) != shape:  # scipy rounds in * (out / in); guard anyway
        raise RuntimeError(f"resampling gave shape {out.shape[-3:]}, expected {shape}")
    return out


def resample_labels(label: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resize a (D, H, W) label map to ``shape``: each class's indicator linearly, then the most likely class.

    Smoother than nearest-neighbour at a coarser grid (a thin structure keeps the voxels it mostly covers).

    Returns:
        (shape) uint8 class indices.
    """
    classes = np.unique(label)
    scores = np.stack([resample_to_shape((label == c).astype(np.float32), shape, order=1) for c in classes])
    return classes[np.argmax(scores, axis=0)].astype(np.uint8)


def resample_case_file(src: PathLike, dst: PathLike, spacing_in: float, spacing_out: float) -> tuple[int, ...]:
    """Resample one isotropic case file (``image``, ``label``) from ``spacing_in`` to ``spacing_out`` mm.

    The image is resized linearly, the label with :func:`resample_labels`; ``dst`` is written atomically with
    a ``spacing`` attribute (so the test measures HD95 / ASD in mm), and the source's other attributes.

    Returns:
        the new spatial shape.

    Raises:
        CaseError: if ``src`` is unreadable, has no ``image`` or ``label``, or their spatial shapes differ.
    """
    if not is_valid_h5(src):
        raise CaseError(str(src), "not a readable case file (needs image float32 and label uint8 of one shape)")
    image, label, attrs = read_case_h5(src)
    shape = tuple(max(1, round(n * spacing_in / spacing_out)) for n in image.shape[-3:])
    attrs = {**attrs, "spacing": np.full(3, spacing_out, dtype=np.float64), "resampled_from_mm": float(spacing_in)}
    write_case_h5(dst, resample_to_shape(image, shape, order=1), resample_labels(label, shape), attrs)
    return shape


# ------------------------------------------------------------------------------------------------- one case


def preprocess_case(
    case: CaseFiles,
    modalities: Sequence[Modality] = ("flair",),
    label_mode: LabelMode = "wt",
    spacing: float | None = None,
    *,
    percentile: float = 99.9,
    clip_over: ClipOver = "volume",
    axis_order: AxisOrder = "xyz",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read, check, crop, normalise, relabel and optionally resample one case.

    Args:
        case: the case's files (:func:`find_cases`).
        modalities: channels in order; default FLAIR only.
        label_mode: ``"wt"`` (default), ``"regions"`` or ``"multiclass"`` (:func:`make_label`).
        spacing: isotropic target voxel size in mm, or None (default, keep the 1 mm grid). Images are resampled
            linearly (order 1), labels by nearest neighbour (order 0), after normalisation (as nnU-Net does).
        percentile, clip_over: see :func:`normalise_intensity`.
        axis_order: ``"xyz"`` (default) or ``"zyx"`` (see the module docstring).

    Returns:
        ``(image, label, attrs)``. ``image`` float32 (D, H, W) for one modality, (C, D, H, W) for several.
        ``label`` uint8 (D, H, W), or (3, D, H, W) for ``"regions"``. ``attrs`` (all that
        :func:`restore_to_original` needs): ``case``, ``modalities``, ``label_mode``, ``source_files``,
        ``original_shape`` and ``original_affine`` (4x4) and ``original_spacing`` of the NIfTI files;
        ``bbox_start`` (first brain voxel, inclusive) and ``bbox_stop_exclusive`` (one past the last), in the
        files' voxel indices; ``axis_order``; ``shape``, ``spacing`` and ``affine`` (voxel -> world, 4x4) of the
        stored arrays; ``resampled`` and ``target_spacing`` (None when not resampled); ``percentile``,
        ``clip_over`` and ``format_version``.

    Raises:
        CaseError: on a missing or unreadable file, differing shapes, an all-zero image, NaN/inf intensities,
            labels outside {0, 1, 2, 4} or outside the brain box, or a constant brain.
        ValueError: on invalid options.
    """
    options = PreprocessOptions(tuple(modalities), label_mode, spacing, percentile, clip_over, axis_order)
    name = case.name
    paths = _required_paths(case, options.modalities)
    volumes, seg, affine, spacing_in = _read_checked(name, paths, options.modalities)
    bbox = _brain_box(name, paths["seg"], volumes, seg)
    box = _slices(bbox)
    channels = []
    for key, data in volumes.items():
        try:
            channels.append(normalise_intensity(data[box], options.percentile, options.clip_over))  # type: ignore[arg-type]
        except ValueError as err:
            raise CaseError(name, f"{paths[key].name}: {err}") from None
    image = np.stack(channels) if len(channels) > 1 else channels[0]
    label = make_label(seg[box], options.label_mode)  # type: ignore[arg-type]

    perm = (0, 1, 2) if options.axis_order == "xyz" else (2, 1, 0)
    image = _permute_spatial(image, perm)
    label = _permute_spatial(label, perm)
    cropped_shape = image.shape[-3:]
    stored_spacing_in = tuple(float(spacing_in[p]) for p in perm)
    if options.spacing is not None:
        shape = tuple(max(1, round(n * s / options.spacing)) for n, s in zip(cropped_shape, stored_spacing_in))
        image = resample_to_shape(image, shape, order=1).astype(np.float32)
        label = resample_to_shape(label, shape, order=0).astype(np.uint8)
    stored_affine = _stored_affine(affine, bbox, perm, cropped_shape, image.shape[-3:])
    attrs = _case_attrs(name, options, paths, seg.shape, affine, spacing_in, bbox, image.shape[-3:], stored_affine)
    return np.ascontiguousarray(image), np.ascontiguousarray(label), attrs


def _read_checked(
    name: str, paths: Mapping[str, Path], modalities: Sequence[str]
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, tuple[float, float, float]]:
    """``(images, seg, affine, spacing)``: the checked volumes (modality -> array, then the label map) and the
    geometry of the first modality's file."""
    loaded = {key: _load_nifti(path, name) for key, path in paths.items()}
    volumes = {key: data for key, (data, _, _) in loaded.items()}
    _, affine, spacing_in = loaded[modalities[0]]
    del loaded
    _check_same_shapes(name, paths, volumes)
    seg = volumes.pop("seg")
    for key, data in volumes.items():
        _check_intensities(name, paths[key], data)
    _check_labels(name, paths["seg"], seg)
    return volumes, seg, affine, spacing_in


def _brain_box(name: str, seg_path: Path, volumes: Mapping[str, np.ndarray], seg: np.ndarray) -> BBox:
    """The bounding box of the voxels nonzero in any modality; every tumour voxel must lie inside it."""
    mask = np.zeros(seg.shape, dtype=bool)
    for data in volumes.values():
        mask |= data != 0
    bbox = nonzero_bbox(mask)
    outside = int(np.count_nonzero(seg)) - int(np.count_nonzero(seg[_slices(bbox)]))
    if outside:
        raise CaseError(name, f"{outside} tumour voxels of {seg_path.name} lie outside the brain bounding box")
    return bbox


def _case_attrs(
    name: str, options: PreprocessOptions, paths: Mapping[str, Path], original_shape: Sequence[int],
    affine: np.ndarray, spacing_in: Sequence[float], bbox: BBox, shape: Sequence[int], stored_affine: np.ndarray,
) -> dict[str, Any]:
    """The geometry and provenance attributes of a case file (listed in :func:`preprocess_case`)."""
    return {
        "format_version": FORMAT_VERSION,
        "case": name,
        "modalities": list(options.modalities),
        "label_mode": options.label_mode,
        "source_files": [paths[key].name for key in (*options.modalities, "seg")],
        "original_shape": np.asarray(original_shape, dtype=np.int64),
        "original_affine": np.asarray(affine, dtype=np.float64),
        "original_spacing": np.asarray(spacing_in, dtype=np.float64),
        "bbox_start": np.asarray([start for start, _ in bbox], dtype=np.int64),
        "bbox_stop_exclusive": np.asarray([stop for _, stop in bbox], dtype=np.int64),
        "axis_order": options.axis_order,
        "shape": np.asarray(shape, dtype=np.int64),
        "spacing": np.linalg.norm(stored_affine[:3, :3], axis=0),
        "affine": stored_affine,
        "resampled": options.spacing is not None,
        "target_spacing": options.spacing,
        "percentile": float(options.percentile),
        "clip_over": options.clip_over,
    }


def _required_paths(case: CaseFiles, modalities: Sequence[str]) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for key in (*modalities, "seg"):
        path = case.seg if key == "seg" else case.images.get(key)
        if path is None:
            label = key.upper() if key == "flair" else key
            raise CaseError(case.name, f"missing {label} file (expected {case.name}_{key}.nii.gz in {case.folder})")
        paths[key] = Path(path)
    return paths


def _load_nifti(path: Path, case: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Read a 3-D NIfTI fully into memory; any reader error becomes a one-line :class:`CaseError`."""
    import nibabel as nib

    try:
        img = nib.load(str(path), mmap=False)
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = img.header.get_zooms()
    except Exception as err:  # nibabel, gzip, zlib, EOF and OS errors all mean "cannot read this file"
        raise CaseError(case, f"cannot read {path.name} ({type(err).__name__}: {err})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseError(case, f"{path.name} must be a 3-D volume, found shape {data.shape}")
    return np.asarray(data), affine, tuple(float(z) for z in zooms[:3])  # type: ignore[return-value]


def _check_same_shapes(case: str, paths: Mapping[str, Path], volumes: Mapping[str, np.ndarray]) -> None:
    first = next(iter(volumes))
    for key, data in volumes.items():
        if data.shape != volumes[first].shape:
            raise CaseError(
                case,
                f"{paths[key].name} has shape {data.shape} but {paths[first].name} has shape {volumes[first].shape}",
            )


def _check_intensities(case: str, path: Path, data: np.ndarray) -> None:
    if np.issubdtype(data.dtype, np.inexact):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise CaseError(case, f"{path.name} has {bad} NaN/inf voxels")
    if not np.any(data):
        raise CaseError(case, f"{path.name} is all zero (no brain voxels)")


def _check_labels(case: str, path: Path, seg: np.ndarray) -> None:
    bad = ~np.isin(seg, BRATS_LABELS)
    if np.any(bad):
        values = np.unique(seg[bad])
        shown = ", ".join(f"{v:g}" for v in values[:5]) + (", ..." if values.size > 5 else "")
        raise CaseError(case, f"{path.name} has labels outside {{0, 1, 2, 4}}: {shown}")


def _permute_spatial(array: np.ndarray, perm: Sequence[int]) -> np.ndarray:
    lead = tuple(range(array.ndim - 3))
    return array.transpose(*lead, *(len(lead) + p for p in perm))


def _stored_affine(
    affine: np.ndarray, bbox: BBox, perm: Sequence[int], cropped_shape: Sequence[int], shape: Sequence[int]
) -> np.ndarray:
    """Voxel -> world of the stored arrays.

    A stored voxel ``r`` (after the permutation ``perm`` and resampling with edge-aligned voxels, factor
    ``f = cropped / stored`` per stored axis) sits at the cropped index ``q = f * r + (f - 1) / 2``, i.e. at the file
    index ``p = start + P q`` with ``P`` the permutation; the file's affine maps ``p`` to the world.
    """
    f = np.asarray(cropped_shape, dtype=np.float64) / np.asarray(shape, dtype=np.float64)
    permute = np.zeros((3, 3))
    for stored_axis, file_axis in enumerate(perm):
        permute[file_axis, stored_axis] = 1.0
    start = np.asarray([s for s, _ in bbox], dtype=np.float64)
    to_file = np.eye(4)
    to_file[:3, :3] = permute @ np.diag(f)
    to_file[:3, 3] = start + permute @ ((f - 1.0) / 2.0)
    return np.asarray(affine, dtype=np.float64) @ to_file


def restore_to_original(pred: np.ndarray, attrs: Mapping[str, Any]) -> np.ndarray:
    """Put a prediction on the stored grid back into the original scan's voxel grid.

    Undoes, in reverse: resampling (nearest neighbour, to exactly the bounding-box shape), the axis order, and the
    crop (pasted into zeros of the original shape). Leading channel axes are kept. Without resampling, restoring
    the stored label gives back the original label volume exactly (every tumour voxel lies in the box).

    Args:
        pred: (..., D, H, W) on the stored grid (``attrs["shape"]``), e.g. an argmax label map.
        attrs: the attributes from :func:`preprocess_case` or :func:`read_h5_attrs`.

    Returns:
        (..., X, Y, Z) array of ``pred``'s dtype in the original NIfTI voxel order; its affine is
        ``attrs["original_affine"]``.

    Raises:
        ValueError: if ``pred``'s spatial shape is not ``attrs["shape"]`` or an attribute is missing.
    """
    try:
        shape = tuple(int(s) for s in np.asarray(attrs["shape"]))
        original_shape = tuple(int(s) for s in np.asarray(attrs["original_shape"]))
        start = [int(s) for s in np.asarray(attrs["bbox_start"])]
        stop = [int(s) for s in np.asarray(attrs["bbox_stop_exclusive"])]
        axis_order = _as_str(attrs.get("axis_order", "xyz"))
    except KeyError as err:
        raise ValueError(f"attrs lack {err.args[0]!r}; pass the attributes written by preprocess_case") from None
    pred = np.asarray(pred)
    if pred.ndim < 3 or tuple(pred.shape[-3:]) != shape:
        raise ValueError(f"pred must end with the stored shape {shape}, got shape {pred.shape}")
    perm = (0, 1, 2) if axis_order == "xyz" else (2, 1, 0)
    box_shape = [b - a for a, b in zip(start, stop)]
    stored_box_shape = [box_shape[p] for p in perm]
    cropped = resample_to_shape(pred, stored_box_shape, order=0)
    cropped = _permute_spatial(cropped, perm)  # the permutation is its own inverse
    out = np.zeros(pred.shape[:-3] + original_shape, dtype=pred.dtype)
    out[(..., *(slice(a, b) for a, b in zip(start, stop)))] = cropped
    return out


# ------------------------------------------------------------------------------------------------------- h5 io


def write_case_h5(
    path: PathLike, image: np.ndarray, label: np.ndarray, attrs: Mapping[str, Any], compression: str | None = "gzip"
) -> Path:
    """Write one case atomically: datasets ``image`` (float32) and ``label`` (uint8), ``attrs`` on the file.

    The file appears at ``path`` only once complete (``utils.atomic.atomic_path``); None-valued attributes
    are left out.

    Args:
        path: target ``.h5`` file; its folder is created.
        image: (D, H, W) or (C, D, H, W).
        label: (D, H, W) or (K, D, H, W), integer values in [0, 255].
        attrs: geometry and provenance (:func:`preprocess_case`).
        compression: h5py compression of both datasets (default ``"gzip"``), or None.

    Raises:
        ValueError: if the spatial shapes differ or the arrays are not 3-D/4-D.
        OSError: if the file cannot be written (e.g. ``errno.ENOSPC``, disk full); nothing is left at ``path``.
    """
    image = np.asarray(image, dtype=np.float32)
    label = np.asarray(label)
    if image.ndim not in (3, 4) or label.ndim not in (3, 4) or image.shape[-3:] != label.shape[-3:]:
        raise ValueError(f"image {image.shape} and label {label.shape} must share their last three (spatial) axes")
    label = label.astype(np.uint8)
    # The file is built in memory and written with plain os.write calls: HDF5 writing straight to a disk that
    # fills up leaves its library in a broken state (errors at every later call, a segfault at exit); a plain
    # write fails with one OSError (ENOSPC) and the temporary file is removed.
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.create_dataset("image", data=image, compression=compression)
        f.create_dataset("label", data=label, compression=compression)
        for key, value in attrs.items():
            if value is not None:
                f.attrs[key] = value
    path = Path(path)
    atomic_write_bytes(path, buffer.getbuffer())
    return path


def read_h5_attrs(path: PathLike) -> dict[str, Any]:
    """The attributes of a case file, strings decoded, string lists as Python lists."""
    with h5py.File(path, "r") as f:
        return {key: _decode(value) for key, value in f.attrs.items()}


def read_case_h5(path: PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(image, label, attrs)`` of a case file written by :func:`write_case_h5`."""
    with h5py.File(path, "r") as f:
        image = f["image"][()]
        label = f["label"][()]
        attrs = {key: _decode(value) for key, value in f.attrs.items()}
    return image, label, attrs


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
        return [_decode(v) for v in value.tolist()]
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _as_str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def is_valid_h5(path: PathLike) -> bool:
    """Whether ``path`` is a readable case file: ``image`` float32 and ``label`` uint8, same spatial shape."""
    try:
        with h5py.File(path, "r") as f:
            image, label = f.get("image"), f.get("label")
            if not isinstance(image, h5py.Dataset) or not isinstance(label, h5py.Dataset):
                return False
            return (
                image.dtype == np.float32
                and label.dtype == np.uint8
                and image.ndim in (3, 4)
                and label.ndim in (3, 4)
                and image.shape[-3:] == label.shape[-3:]
                and image.size > 0
            )
    except Exception:  # unreadable, truncated, not HDF5
        return False


def _option_mismatch(path: Path, options: PreprocessOptions) -> str | None:
    """Describe how an existing valid file differs from ``options``, or None when it matches."""
    attrs = read_h5_attrs(path)
    if "format_version" not in attrs:
        return "was not written by this preprocessing (no format_version attribute)"
    wanted = {
        "modalities": list(options.modalities),
        "label_mode": options.label_mode,
        "target_spacing": options.spacing,
        "percentile": float(options.percentile),
        "clip_over": options.clip_over,
        "axis_order": options.axis_order,
    }
    diffs = []
    for key, value in wanted.items():
        found = attrs.get(key)
        found = float(found) if isinstance(found, (np.floating, float)) else found
        if found != value:
            diffs.append(f"{key}={found!r} (asked {value!r})")
    return ("has " + ", ".join(diffs)) if diffs else None


def process_case_to_h5(
    case: CaseFiles, data_dir: PathLike, options: PreprocessOptions, overwrite: bool = False
) -> Literal["written", "skipped"]:
    """Preprocess one case into ``<data_dir>/<case>.h5`` unless a valid file made with the same options is there.

    Returns:
        ``"written"`` or ``"skipped"`` (a valid file with the same options exists and ``overwrite`` is False).

    Raises:
        CaseError: on bad input (:func:`preprocess_case`), or when a valid file made with other options exists
            and ``overwrite`` is False.
        OutputError: when the h5 cannot be written (``"<case>: no space left on device ..."`` for a full disk);
            no file, not even a partial one, is left behind.
    """
    path = Path(data_dir) / f"{case.name}.h5"
    if not overwrite and is_valid_h5(path):
        mismatch = _option_mismatch(path, options)
        if mismatch is None:
            return "skipped"
        raise CaseError(case.name, f"{path} exists but {mismatch}; use overwrite (--overwrite) to replace it")
    image, label, attrs = preprocess_case(
        case,
        options.modalities,  # type: ignore[arg-type]
        options.label_mode,  # type: ignore[arg-type]
        options.spacing,
        percentile=options.percentile,
        clip_over=options.clip_over,  # type: ignore[arg-type]
        axis_order=options.axis_order,  # type: ignore[arg-type]
    )
    try:
        write_case_h5(path, image, label, attrs)
    except OSError as err:
        if is_no_space_error(err):
            raise OutputError(f"{case.name}: no space left on device while writing {path}") from None
        reason = (err.strerror or str(err)).lower()
        raise OutputError(f"{case.name}: cannot write {path} ({reason})") from None
    return "written"


def try_process_case(
    case: CaseFiles, data_dir: PathLike, options: PreprocessOptions, overwrite: bool = False
) -> CaseResult:
    """:func:`process_case_to_h5` that never raises: failures come back as ``status="failed"`` with a one-line message.

    Meant for worker processes, where one bad case must not stop the others. The exception is
    :class:`OutputError`, which is raised: a full disk or an unwritable folder stops every case that follows.
    """
    try:
        status = process_case_to_h5(case, data_dir, options, overwrite)
        return CaseResult(case.name, status, "")
    except OutputError:
        raise
    except CaseError as err:
        return CaseResult(case.name, "failed", str(err))
    except Exception as err:  # e.g. disk full: still one line naming the case
        return CaseResult(case.name, "failed", str(CaseError(case.name, f"{type(err).__name__}: {err}")))


# ---------------------------------------------------------------------------------------------------- splits


def split_sizes(n: int) -> tuple[int, int, int]:
    """``(train, val, test)`` sizes in the published proportions 250 / 25 / 60 of 335.

    ``val`` and ``test`` are ``round(n * 25 / 335)`` and ``round(n * 60 / 335)``, each at least 1 once ``n >= 3``;
    ``train`` takes the rest. Below 3 cases everything goes to ``train``.

    Raises:
        ValueError: if ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"need at least one case to split, got {n}")
    if n < 3:
        return n, 0, 0
    n_val = max(1, round(n * _SPLIT_REFERENCE["val"] / _SPLIT_TOTAL))
    n_test = max(1, round(n * _SPLIT_REFERENCE["test"] / _SPLIT_TOTAL))
    return n - n_val - n_test, n_val, n_test


def make_splits(
    case_names: Sequence[str], seed: int, out_dir: PathLike, log: Callable[[str], None] | None = None
) -> dict[str, list[str]]:
    """Use the split lists in ``out_dir``, or write a seeded 250/25/60-proportioned one; remake our own when needed.

    A generated split is ``sorted(case_names)`` permuted with ``numpy.random.default_rng(seed)`` and cut by
    :func:`split_sizes` (train first, so the labelled subset, the first N lines of ``train.txt``, is a random
    draw). Each list is written atomically, then :data:`SPLIT_MANIFEST` records the cases, the seed and the
    lists. Existing lists are treated as follows:

    - **made by this function** (the manifest is there and every list present holds exactly what it records):
      kept while ``case_names`` are the cases it was made from (a new ``seed`` alone changes nothing, with a
      note); remade with ``seed`` when the set of cases changed (a case fixed after a failed run, or one that
      now fails), with a note naming the cases added and removed; remade when a list was deleted;
    - **supplied by the user** (no manifest, or lists that differ from it): never changed. They are checked:
      all three present, every listed case has ``<out_dir>/data/<case>.h5``, no case listed twice.

    Args:
        case_names: the cases that have a good h5 now.
        seed: seed of a generated split.
        out_dir: folder of ``train.txt``, ``val.txt``, ``test.txt`` and ``data/``.
        log: called with each one-line note (e.g. ``print`` to stderr); notes are dropped by default.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}``.

    Raises:
        ValueError: if only some of the user's lists exist, a list names a case without an h5 or a case twice,
            ``train.txt`` is empty, or ``case_names`` is empty or repeats a name.
        OSError: if a list cannot be written.
    """
    note = log if log is not None else (lambda message: None)
    out = Path(out_dir)
    files = {split: out / f"{split}.txt" for split in SPLIT_NAMES}
    present = [split for split, path in files.items() if path.exists()]
    names = sorted(case_names)
    if len(set(names)) != len(names):
        raise ValueError("case_names repeats a name")
    if present:
        kept = _kept_split(out, files, present, names, seed, note)
        if kept is not None:
            return kept
    if not names:
        raise ValueError("need at least one case to split, got none")
    return _write_split(names, seed, out, files)


def _kept_split(
    out: Path, files: Mapping[str, Path], present: Sequence[str], names: list[str], seed: int,
    note: Callable[[str], None],
) -> dict[str, list[str]] | None:
    """The existing lists when :func:`make_splits` keeps them (the user's, or ours made from ``names``); None, with
    a note, when ours must be remade."""
    manifest = _read_manifest(out / SPLIT_MANIFEST, note)
    ours = manifest is not None and all(_read_list(files[s]) == manifest["lists"].get(s) for s in present)
    if manifest is None or not ours:
        if manifest is not None:
            note(
                f"the split lists in {out} differ from what {SPLIT_MANIFEST} records: taken as your own and "
                f"left as they are (delete the lists and {SPLIT_MANIFEST} to have them remade)"
            )
        if len(present) != len(files):
            missing = ", ".join(files[s].name for s in SPLIT_NAMES if s not in present)
            raise ValueError(
                f"{out} has {', '.join(files[s].name for s in present)} but lacks {missing}; "
                "provide all three split lists or none"
            )
        return _read_splits(files, out / "data")
    made_from = manifest["cases"]
    if made_from == names and len(present) == len(files):
        if int(manifest["seed"]) != seed:
            note(
                f"kept the split in {out} made with seed {manifest['seed']}; seed {seed} is used only when the "
                "split is remade (when the set of good cases changes)"
            )
        return _read_splits(files, out / "data")
    added = sorted(set(names) - set(made_from))
    removed = sorted(set(made_from) - set(names))
    if added or removed:
        note(
            f"the good cases changed since the split in {out} was made ({_changes(added, removed)}): "
            f"remaking it with seed {seed} over {len(names)} cases"
        )
    else:
        note(f"{out} lacks some split lists: remaking the split with seed {seed} over {len(names)} cases")
    return None


def _write_split(names: list[str], seed: int, out: Path, files: Mapping[str, Path]) -> dict[str, list[str]]:
    """Permute ``names`` with ``seed``, cut by :func:`split_sizes`, write the lists and then the manifest."""
    sizes = split_sizes(len(names))
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [names[i] for i in order]
    splits: dict[str, list[str]] = {}
    first = 0
    for split, size in zip(SPLIT_NAMES, sizes):
        splits[split] = shuffled[first : first + size]
        first += size
    for split, path in files.items():
        with atomic_path(path) as tmp:
            tmp.write_text("".join(f"{name}\n" for name in splits[split]), encoding="utf-8")
    manifest_text = json.dumps({"made_by": "make_splits", "seed": int(seed), "cases": names, "lists": splits}, indent=1)
    atomic_write_text(out / SPLIT_MANIFEST, manifest_text + "\n")
    return splits


def _read_list(path: Path) -> list[str] | None:
    """The case names of a split list (CRLF, surrounding blanks and blank lines dropped), None if it is absent."""
    if not path.is_file():
        return None
    names = [line.strip() for line in re.split(r"\r\n|\r|\n", path.read_text(encoding="utf-8"))]
    return [name for name in names if name]


def _read_manifest(path: Path, note: Callable[[str], None]) -> dict[str, Any] | None:
    """The content of a split manifest, or None when it is absent or not one (with a note for the latter)."""
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        valid = (
            isinstance(manifest, dict)
            and isinstance(manifest.get("seed"), int)
            and isinstance(manifest.get("cases"), list)
            and isinstance(manifest.get("lists"), dict)
        )
    except (OSError, UnicodeDecodeError, ValueError):
        valid = False
    if not valid:
        note(f"{path} is not a split manifest written by this tool: the split lists beside it are taken as your own")
        return None
    return manifest


def _changes(added: Sequence[str], removed: Sequence[str]) -> str:
    parts = []
    for label, items in (("added", added), ("removed", removed)):
        if items:
            shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
            parts.append(f"{label}: {shown}")
    return "; ".join(parts)


def _read_splits(files: Mapping[str, Path], data_dir: Path) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for split, path in files.items():
        names = _read_list(path) or []
        for name in names:
            if name in seen:
                where = "twice in " + path.name if seen[name] == path.name else f"in {seen[name]} and {path.name}"
                raise ValueError(f"case {name!r} is listed {where}; a case belongs to one list only")
            seen[name] = path.name
        missing = [name for name in names if not (data_dir / f"{name}.h5").is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ValueError(f"{path} lists {len(missing)} case(s) without an h5 in {data_dir}: {shown}")
        splits[split] = names
    if not splits["train"]:
        raise ValueError(f"{files['train']} is empty")
    return splits
