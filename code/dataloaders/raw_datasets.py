"""Raw 3-D datasets in the nnU-Net v2 or Medical Segmentation Decathlon layout -> one HDF5 file per case.

Two raw layouts are read (:func:`read_raw_dataset` tells them apart by their ``dataset.json``):

``nnunet`` (nnU-Net v2 raw folder)
    ``dataset.json`` with ``channel_names`` (``{"0": "T2", "1": "ADC"}``), ``labels`` (``{"background": 0,
    "tumour": 1}``), ``file_ending`` (``".nii.gz"``) and ``numTraining``; one file per channel
    ``imagesTr/<case>_<XXXX><file_ending>`` (XXXX = 0000, 0001 ...) and ``labelsTr/<case><file_ending>``.
``msd`` (Medical Segmentation Decathlon task folder)
    ``dataset.json`` with ``modality`` (``{"0": "FLAIR", ...}``), ``labels`` (``{"0": "background", ...}``) and
    ``training`` (``[{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...]``); one image per
    case, 4-D ``(X, Y, Z, C)`` when there are several modalities. The nnU-Net v1 variant of this layout (the same
    ``dataset.json``, but one ``<case>_XXXX.nii.gz`` file per channel) is read too.

In both, an image of ``imagesTr`` without a label file, and every case of an optional ``imagesUnlabelled/`` folder
(named as in ``imagesTr``), is an **unlabelled** case: it is written without a ``label`` dataset. ``imagesTs/``
(test images without labels) is not read.

Per case (:func:`prepare_case`): read and check every file; optionally crop to the nonzero box
(``crop=True``); normalise each channel (:func:`zscore_foreground`, or :func:`ct_normalise` with dataset-wide
statistics from :func:`ct_intensity_properties`, or not at all); remap the label values to ``0 .. K-1`` in the
order of ``dataset.json``'s ``labels`` (:func:`remap_labels`); optionally resample to an isotropic spacing
(``dataloaders.preprocess.resample_to_shape``: linear for images, nearest for labels). :func:`write_prepared_case` writes the file
atomically.

Arrays keep the NIfTI's own voxel order ``(x, y, z)``, stored as ``(D, H, W)`` (``(C, D, H, W)`` for several
channels); the ``affine`` attribute maps a stored voxel to world coordinates. Only NIfTI files (``.nii.gz``,
``.nii``) are read.

Problems with the dataset as a whole raise :class:`RawDatasetError`; problems with one case raise
:class:`~dataloaders.preprocess.CaseError` (a one-line ``ValueError`` starting with the case name). Both name the
file and say what was expected.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple, Tuple, TypeVar, Union

import h5py
import numpy as np

from dataloaders.preprocess import BBox, CaseError, OutputError, nonzero_bbox, resample_to_shape, write_case_h5
from utils.atomic import atomic_write_bytes, is_no_space_error
from utils.process import exit_with_parent

__all__ = [
    "LAYOUTS",
    "NORMALISATIONS",
    "UNLABELLED_FOLDER",
    "CaseOutcome",
    "PrepareOptions",
    "RawCase",
    "RawDataset",
    "RawDatasetError",
    "ct_foreground_samples",
    "ct_intensity_properties",
    "ct_normalise",
    "ct_samples_per_case",
    "prepare_case",
    "prepare_case_to_h5",
    "read_raw_dataset",
    "remap_labels",
    "run_in_workers",
    "stored_affine",
    "try_prepare_case",
    "write_prepared_case",
    "zscore_foreground",
]

PathLike = Union[str, "os.PathLike[str]"]
Layout = Literal["nnunet", "msd"]
Normalisation = Literal["zscore", "ct", "none"]
LabelSpec = Tuple[Tuple[str, int], ...]
"""``((name, value in the raw label files), ...)`` in ``dataset.json`` order; class index = position."""

LAYOUTS: tuple[str, ...] = ("nnunet", "msd")
NORMALISATIONS: tuple[str, ...] = ("zscore", "ct", "none")
UNLABELLED_FOLDER = "imagesUnlabelled"
FORMAT_VERSION = 1

_NIFTI_ENDINGS = (".nii.gz", ".nii")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_EXPECTED_LAYOUTS = (
    "an nnU-Net v2 raw folder (dataset.json with 'channel_names', 'labels', 'file_ending'; imagesTr/, labelsTr/) "
    "or a Medical Segmentation Decathlon task folder (dataset.json with 'modality', 'labels', 'training'; "
    "imagesTr/, labelsTr/)"
)
# nnU-Net v2 takes its CT statistics from at most 10^7 foreground voxels over the whole training set.
_CT_SAMPLES_TOTAL = 10_000_000
_CT_SAMPLES_MIN_PER_CASE = 1_000


class RawDatasetError(ValueError):
    """The raw dataset as a whole cannot be read (no or bad ``dataset.json``, unknown layout ...); one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class RawCase:
    """The files of one raw case.

    Attributes:
        name: case identifier, e.g. ``prostate_00``.
        images: one file per channel (``channels_in_file=False``), or the single file holding every channel.
        label: the label file, or None for an unlabelled case.
        channels_in_file: whether ``images[0]`` holds all channels along its 4th axis (MSD).
        problem: a problem found while listing the files (e.g. a missing channel file); reported as a
            :class:`CaseError` when the case is prepared.
    """

    name: str
    images: tuple[Path, ...]
    label: Path | None
    channels_in_file: bool = False
    problem: str | None = None

    @property
    def labelled(self) -> bool:
        return self.label is not None


@dataclass(frozen=True)
class RawDataset:
    """A raw dataset as found by :func:`read_raw_dataset`.

    Attributes:
        root: the raw folder.
        layout: ``"nnunet"`` or ``"msd"``.
        name: ``dataset.json``'s ``name``, else the folder name.
        channel_names: channel names, in channel order.
        labels: ``((name, raw value), ...)`` in ``dataset.json`` order; class ``i`` of the output is ``labels[i]``.
        cases: every case, sorted by name (labelled and unlabelled).
        notes: one-line remarks for the user (e.g. ``numTraining`` differs from the labelled cases found).
    """

    root: Path
    layout: Layout
    name: str
    channel_names: tuple[str, ...]
    labels: LabelSpec
    cases: tuple[RawCase, ...]
    notes: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def label_indices(self) -> dict[str, int]:
        """Label name -> class index in the output (``0 .. K-1``)."""
        return {name: index for index, (name, _) in enumerate(self.labels)}


@dataclass(frozen=True)
class PrepareOptions:
    """Everything that decides the content of an output file; checked once here.

    Args:
        spacing: isotropic target voxel size in mm, or None (default) to keep the voxels.
        normalisation: ``"zscore"`` (default, per case and channel over the nonzero voxels), ``"ct"`` (clip to the
            dataset's foreground 0.5 / 99.5 percentiles, then z-score with the dataset's foreground mean and std,
            as nnU-Net's ``CTNormalization``) or ``"none"``.
        crop: crop to the bounding box of the nonzero image voxels and the labelled voxels (default False).

    Raises:
        ValueError: on a non-positive spacing or an unknown normalisation.
    """

    spacing: float | None = None
    normalisation: Normalisation = "zscore"
    crop: bool = False

    def __post_init__(self) -> None:
        if self.spacing is not None:
            spacing = float(self.spacing)
            if not (math.isfinite(spacing) and spacing > 0):
                raise ValueError(f"spacing must be a positive number of mm or None, got {self.spacing!r}")
            object.__setattr__(self, "spacing", spacing)
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")


class CaseOutcome(NamedTuple):
    """Outcome of :func:`try_prepare_case`: ``status`` is ``"written"`` or ``"failed"``."""

    name: str
    status: str
    labelled: bool
    message: str


# ------------------------------------------------------------------------------------------------- discovery


def read_raw_dataset(raw_dir: PathLike) -> RawDataset:
    """Read ``dataset.json`` of a raw folder, tell the layout, and list every case's files.

    Args:
        raw_dir: an nnU-Net v2 raw dataset folder (``Dataset001_X``) or an MSD task folder (``Task01_X``).

    Returns:
        The dataset; cases whose files are incomplete carry a ``problem`` (reported when prepared).

    Raises:
        RawDatasetError: if the folder or ``dataset.json`` is missing, ``dataset.json`` is not JSON or in neither
            layout, labels are region-based, repeated or lack the background 0, the file ending is not NIfTI, or
            there is no case at all.
    """
    root = Path(raw_dir)
    if not root.is_dir():
        raise RawDatasetError(f"raw folder {root} does not exist or is not a folder; expected {_EXPECTED_LAYOUTS}")
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise RawDatasetError(f"{root} has no dataset.json; expected {_EXPECTED_LAYOUTS}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise RawDatasetError(f"{meta_path} is not valid JSON ({err}); expected {_EXPECTED_LAYOUTS}") from None
    if not isinstance(meta, dict):
        raise RawDatasetError(f"{meta_path} must hold a JSON object, found {type(meta).__name__}")
    if "channel_names" in meta and "file_ending" in meta:
        return _read_nnunet(root, meta_path, meta)
    if "modality" in meta and "training" in meta:
        return _read_msd(root, meta_path, meta)
    raise RawDatasetError(f"{meta_path} is in no known layout (keys: {sorted(meta)}); expected {_EXPECTED_LAYOUTS}")


def _read_nnunet(root: Path, meta_path: Path, meta: Mapping[str, Any]) -> RawDataset:
    channels = _channel_names(meta_path, meta["channel_names"], "channel_names")
    labels = _nnunet_labels(meta_path, meta.get("labels"))
    ending = meta["file_ending"]
    if ending not in _NIFTI_ENDINGS:
        raise RawDatasetError(
            f"{meta_path}: file_ending {ending!r} is not supported; expected one of {list(_NIFTI_ENDINGS)} (NIfTI)"
        )
    images_dir = _images_folder(root, meta_path)
    cases: dict[str, RawCase] = {}
    for case in _nnunet_cases(images_dir, root / "labelsTr", ending, len(channels), labelled=True):
        cases[case.name] = case
    for name in sorted(_label_stems(root / "labelsTr", ending)):
        if name not in cases:
            cases[name] = _orphan_label(name, root / "labelsTr" / f"{name}{ending}", images_dir, f"{name}_0000{ending}")
    extra = root / UNLABELLED_FOLDER
    if extra.is_dir():
        for case in _nnunet_cases(extra, None, ending, len(channels), labelled=False):
            cases[case.name] = _unless_duplicate(case, cases.get(case.name))
    notes = []
    n_labelled = sum(c.labelled for c in cases.values())
    declared = meta.get("numTraining")
    if isinstance(declared, int) and declared != n_labelled:
        notes.append(f"{meta_path} says numTraining {declared} but {n_labelled} labelled case(s) were found")
    return _finish(root, meta_path, meta, "nnunet", channels, labels, cases, notes)


def _read_msd(root: Path, meta_path: Path, meta: Mapping[str, Any]) -> RawDataset:
    channels = _channel_names(meta_path, meta["modality"], "modality")
    labels = _msd_labels(meta_path, meta.get("labels"))
    training = meta["training"]
    if not isinstance(training, list):
        raise RawDatasetError(f"{meta_path}: 'training' must be a list of {{'image': ..., 'label': ...}}")
    cases: dict[str, RawCase] = {}
    listed: set[str] = set()
    for i, entry in enumerate(training):
        paths = (entry.get("image"), entry.get("label")) if isinstance(entry, dict) else (None, None)
        if not all(isinstance(p, str) for p in paths):
            raise RawDatasetError(
                f"{meta_path}: training[{i}] must be {{'image': './imagesTr/<case>.nii.gz', 'label': "
                f"'./labelsTr/<case>.nii.gz'}}, found {entry!r}"
            )
        image = Path(os.path.normpath(root / entry["image"]))  # drops the "./" of "./imagesTr/x.nii.gz"
        label = Path(os.path.normpath(root / entry["label"]))
        name = _strip_nifti(image.name)
        if name in cases:
            raise RawDatasetError(f"{meta_path}: case {name!r} is listed twice in 'training'")
        listed.add(image.name)
        case = _msd_case(name, image, label, len(channels))
        if case.problem is None and not label.is_file():
            case = RawCase(
                name, case.images, label, case.channels_in_file,
                problem=f"{label} is missing; {meta_path.name} lists it as the label of {image.name}",
            )
        cases[name] = case
    # The nnU-Net v1 variant lists "./imagesTr/x.nii.gz" but stores one x_XXXX.nii.gz file per channel.
    per_channel = any(not c.channels_in_file for c in cases.values())
    ending = next((e for e in _NIFTI_ENDINGS if training and str(training[0]["image"]).endswith(e)), ".nii.gz")
    for folder, labels_dir in ((root / "imagesTr", root / "labelsTr"), (root / UNLABELLED_FOLDER, None)):
        if not folder.is_dir():
            continue
        if per_channel:
            found = list(_nnunet_cases(folder, labels_dir, ending, len(channels), labelled=labels_dir is not None))
        else:
            found = []
            for path in _nifti_files(folder):
                label = None if labels_dir is None else labels_dir / path.name
                label = label if label is not None and label.is_file() else None
                found.append(_msd_case(_strip_nifti(path.name), path, label, len(channels)))
        for case in found:  # images that 'training' does not list: labelled when labelsTr has their label
            if labels_dir is not None and (case.name in cases or (case.images and case.images[0].name in listed)):
                continue
            cases[case.name] = _unless_duplicate(case, cases.get(case.name))
    return _finish(root, meta_path, meta, "msd", channels, labels, cases, [])


def _finish(
    root: Path,
    meta_path: Path,
    meta: Mapping[str, Any],
    layout: str,
    channels: tuple[str, ...],
    labels: LabelSpec,
    cases: Mapping[str, RawCase],
    notes: Sequence[str],
) -> RawDataset:
    if not cases:
        raise RawDatasetError(
            f"{root} holds no case: expected images in {root / 'imagesTr'} (as {meta_path.name} says)"
        )
    name = meta.get("name") if isinstance(meta.get("name"), str) and meta.get("name") else root.name
    return RawDataset(
        root=root,
        layout=layout,
        name=name,
        channel_names=channels,
        labels=labels,
        cases=tuple(cases[n] for n in sorted(cases)),
        notes=tuple(notes),
    )


def _channel_names(meta_path: Path, value: Any, key: str) -> tuple[str, ...]:
    """``{"0": "T2", "1": "ADC"}`` -> ``("T2", "ADC")``; the keys must be 0 .. C-1."""
    if not isinstance(value, dict) or not value:
        raise RawDatasetError(
            f"{meta_path}: {key!r} must be a non-empty object like {{\"0\": \"T2\"}}, found {value!r}"
        )
    try:
        order = sorted(value, key=int)
    except ValueError:
        raise RawDatasetError(
            f"{meta_path}: the keys of {key!r} must be channel numbers 0, 1, ..., found {sorted(value)}"
        ) from None
    if [int(k) for k in order] != list(range(len(order))):
        raise RawDatasetError(f"{meta_path}: the keys of {key!r} must be 0 .. {len(order) - 1}, found {order}")
    return tuple(str(value[k]) for k in order)


def _nnunet_labels(meta_path: Path, value: Any) -> LabelSpec:
    """``{"background": 0, "tumour": 1}`` -> ``(("background", 0), ("tumour", 1))``; no regions, no ignore label."""
    if not isinstance(value, dict) or not value:
        raise RawDatasetError(
            f"{meta_path}: 'labels' must be an object like {{\"background\": 0, \"tumour\": 1}}, found {value!r}"
        )
    spec = []
    for name, raw in value.items():
        if isinstance(raw, (list, tuple)):
            raise RawDatasetError(
                f"{meta_path}: label {name!r} is a region {list(raw)} (nnU-Net region-based training); only one "
                "integer value per label is supported"
            )
        if name == "ignore":
            raise RawDatasetError(
                f"{meta_path}: the 'ignore' label (unannotated voxels, value {raw!r}) is not supported; expected "
                "fully annotated labels"
            )
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise RawDatasetError(f"{meta_path}: label {name!r} must have an integer value, found {raw!r}")
        spec.append((str(name), int(raw)))
    return _check_label_spec(meta_path, tuple(spec))


def _msd_labels(meta_path: Path, value: Any) -> LabelSpec:
    """``{"0": "background", "1": "edema"}`` -> ``(("background", 0), ("edema", 1))``."""
    if not isinstance(value, dict) or not value:
        raise RawDatasetError(
            f"{meta_path}: 'labels' must be an object like {{\"0\": \"background\"}}, found {value!r}"
        )
    spec = []
    for raw, name in value.items():
        try:
            spec.append((str(name), int(raw)))
        except ValueError:
            raise RawDatasetError(
                f"{meta_path}: the keys of 'labels' must be label values 0, 1, ..., found {raw!r}"
            ) from None
    return _check_label_spec(meta_path, tuple(spec))


def _check_label_spec(meta_path: Path, spec: LabelSpec) -> LabelSpec:
    values = [v for _, v in spec]
    if len(set(values)) != len(values):
        raise RawDatasetError(f"{meta_path}: label values repeat: {dict(spec)}")
    # Class 0 is the background for training and metrics; keep it there rather than silently renumber it.
    if spec[0][1] != 0:
        raise RawDatasetError(
            f"{meta_path}: the first label must be the background with value 0, found {spec[0][0]!r}: {spec[0][1]}"
        )
    if len(spec) > 256:
        raise RawDatasetError(f"{meta_path}: {len(spec)} labels do not fit the uint8 label maps (at most 256)")
    return spec


def _images_folder(root: Path, meta_path: Path) -> Path:
    folder = root / "imagesTr"
    if not folder.is_dir():
        raise RawDatasetError(f"{root} has no imagesTr/ folder; expected the training images there ({meta_path.name})")
    return folder


def _nifti_files(folder: Path) -> list[Path]:
    """NIfTI files of a folder, sorted; hidden files (macOS ``._x.nii.gz`` in the MSD archives) are skipped."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if not p.name.startswith(".") and p.name.lower().endswith(_NIFTI_ENDINGS)
    )


def _strip_nifti(filename: str) -> str:
    for ending in _NIFTI_ENDINGS:
        if filename.lower().endswith(ending):
            return filename[: -len(ending)]
    return filename


def _label_stems(folder: Path, ending: str) -> list[str]:
    if not folder.is_dir():
        return []
    return [p.name[: -len(ending)] for p in folder.iterdir() if p.name.endswith(ending) and not p.name.startswith(".")]


def _nnunet_cases(
    folder: Path, labels_dir: Path | None, ending: str, n_channels: int, labelled: bool
) -> Iterator[RawCase]:
    """Group ``<case>_XXXX<ending>`` files by case; check the channel files against ``channel_names``."""
    groups: dict[str, dict[int, Path]] = {}
    strays: list[Path] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(ending):
            continue
        match = _CHANNEL_RE.match(path.name[: -len(ending)])
        if match is None:
            strays.append(path)
            continue
        groups.setdefault(match["case"], {})[int(match["channel"])] = path
    for path in strays:
        name = path.name[: -len(ending)]
        yield RawCase(
            name, (path,), None,
            problem=f"{path} has no channel suffix; expected {name}_0000{ending} (one file per channel, nnU-Net v2)",
        )
    for name in sorted(groups):
        files = groups[name]
        expected = [folder / f"{name}_{c:04d}{ending}" for c in range(n_channels)]
        missing = [p for c, p in enumerate(expected) if c not in files]
        extra = [files[c] for c in sorted(files) if c >= n_channels]
        label = None
        if labelled and labels_dir is not None and (labels_dir / f"{name}{ending}").is_file():
            label = labels_dir / f"{name}{ending}"
        problem = None
        if missing:
            problem = (
                f"{missing[0]} is missing; dataset.json lists {n_channels} channel(s), expected "
                f"{', '.join(p.name for p in expected)}"
            )
        elif extra:
            problem = (
                f"{extra[0]} is one channel too many; dataset.json lists {n_channels} channel(s), expected "
                f"{', '.join(p.name for p in expected)}"
            )
        yield RawCase(name, tuple(files[c] for c in sorted(files) if c < n_channels), label, problem=problem)


def _msd_case(name: str, image: Path, label: Path | None, n_channels: int) -> RawCase:
    """One MSD case: a single (4-D) image file, or per-channel ``<case>_XXXX`` files (nnU-Net v1 style)."""
    if image.is_file():
        return RawCase(name, (image,), label, channels_in_file=True)
    stem = _strip_nifti(image.name)
    ending = image.name[len(_strip_nifti(image.name)) :] or ".nii.gz"
    per_channel = [image.parent / f"{stem}_{c:04d}{ending}" for c in range(n_channels)]
    if any(p.is_file() for p in per_channel):
        missing = [p for p in per_channel if not p.is_file()]
        problem = None
        if missing:
            problem = (
                f"{missing[0]} is missing; dataset.json lists {n_channels} modalit(ies), expected "
                f"{', '.join(p.name for p in per_channel)}"
            )
        return RawCase(stem, tuple(p for p in per_channel if p.is_file()), label, problem=problem)
    return RawCase(name, (image,), label, channels_in_file=True, problem=f"{image} is missing (listed in dataset.json)")


def _orphan_label(name: str, label: Path, images_dir: Path, expected: str) -> RawCase:
    return RawCase(name, (), label, problem=f"{label} has no image; expected {images_dir / expected}")


def _unless_duplicate(case: RawCase, existing: RawCase | None) -> RawCase:
    if existing is None:
        return case
    where = existing.images[0].parent if existing.images else existing.label
    return RawCase(
        case.name, case.images, None, case.channels_in_file,
        problem=f"{case.images[0]} repeats the case name {case.name!r} of {where}; expected unique case names",
    )


# ------------------------------------------------------------------------------------------------ array steps


def zscore_foreground(image: np.ndarray) -> np.ndarray:
    """Z-score one channel with the mean and std of its nonzero voxels, applied to every voxel.

    .. math::

        \\mathrm{out} = (I - \\mu) / \\sigma, \\qquad \\mu, \\sigma = \\mathrm{mean}, \\mathrm{std}(I_i : I_i \\ne 0)

    ``sigma`` is the population std (ddof 0). As in the project's BraTS data, the background becomes
    ``-mu / sigma``. An image without zeros (CT, noisy MRI) is z-scored over the whole volume.

    Raises:
        ValueError: if no voxel is nonzero, or the nonzero voxels are constant.
    """
    values = np.asarray(image, dtype=np.float64)
    foreground = values[values != 0]
    if foreground.size == 0:
        raise ValueError("is all zero; expected some nonzero (foreground) voxels to normalise with")
    mean, std = float(foreground.mean()), float(foreground.std())
    if not std > 0:
        raise ValueError(f"has {foreground.size} nonzero voxels all equal to {mean:g} (std 0); cannot z-score")
    return ((values - mean) / std).astype(np.float32)


def ct_normalise(image: np.ndarray, properties: Mapping[str, float]) -> np.ndarray:
    """nnU-Net's ``CTNormalization``: clip to the dataset's foreground percentiles, z-score with its statistics.

    .. math::

        \\mathrm{out} = (\\mathrm{clip}(I, p_{0.5}, p_{99.5}) - \\mu) / \\max(\\sigma, 10^{-8})

    Args:
        image: one channel, any shape.
        properties: ``percentile_00_5``, ``percentile_99_5``, ``mean``, ``std`` (:func:`ct_intensity_properties`).
    """
    values = np.clip(np.asarray(image, dtype=np.float64), properties["percentile_00_5"], properties["percentile_99_5"])
    return ((values - properties["mean"]) / max(float(properties["std"]), 1e-8)).astype(np.float32)


def ct_intensity_properties(samples: Sequence[np.ndarray]) -> dict[str, float]:
    """Statistics of foreground (labelled, label > 0) intensities pooled over the training cases of one channel.

    The mean and std are those of the samples clipped to their 0.5 / 99.5 percentiles (nnU-Net v2
    ``CTNormalization``).

    Returns:
        ``{"mean", "std", "percentile_00_5", "percentile_99_5", "num_samples"}``.

    Raises:
        ValueError: if there are no samples.
    """
    pooled = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in samples]) if samples else np.empty(0)
    if pooled.size == 0:
        raise ValueError("no labelled foreground voxel (label > 0) in any case to take CT statistics from")
    low, high = (float(v) for v in np.percentile(pooled, [0.5, 99.5]))
    clipped = np.clip(pooled, low, high)
    return {
        "mean": float(clipped.mean()),
        "std": float(clipped.std()),
        "percentile_00_5": low,
        "percentile_99_5": high,
        "num_samples": int(pooled.size),
    }


def remap_labels(label: np.ndarray, labels: LabelSpec) -> tuple[np.ndarray, list[int]]:
    """Raw label values -> class indices ``0 .. K-1`` in the order of ``labels``.

    Args:
        label: raw label map, any integer or integer-valued float dtype.
        labels: ``((name, raw value), ...)``; class ``i`` is ``labels[i]``.

    Returns:
        ``(classes, unknown)``: ``classes`` uint8 of ``label``'s shape, and the raw values not in ``labels``
        (sorted; empty when all are known, ``classes`` is then complete). Non-integer values count as unknown.
    """
    values, inverse = np.unique(np.asarray(label), return_inverse=True)
    lookup = {value: index for index, (_, value) in enumerate(labels)}
    table = np.zeros(values.size, dtype=np.uint8)
    unknown = []
    for i, value in enumerate(values.tolist()):
        if float(value).is_integer() and int(value) in lookup:
            table[i] = lookup[int(value)]
        else:
            unknown.append(value)
    return table[inverse.reshape(label.shape)], unknown


def stored_affine(
    affine: np.ndarray, start: Sequence[int], box_shape: Sequence[int], shape: Sequence[int]
) -> np.ndarray:
    """Voxel -> world of an array cropped at ``start`` (box ``box_shape``) and resampled to ``shape``.

    A stored voxel ``r`` (edge-aligned resampling, factor ``f = box_shape / shape`` per axis) sits at the file
    index ``p = start + f r + (f - 1) / 2``; ``affine`` maps ``p`` to the world.
    """
    f = np.asarray(box_shape, dtype=np.float64) / np.asarray(shape, dtype=np.float64)
    to_file = np.eye(4)
    to_file[:3, :3] = np.diag(f)
    to_file[:3, 3] = np.asarray(start, dtype=np.float64) + (f - 1.0) / 2.0
    return np.asarray(affine, dtype=np.float64) @ to_file


def _target_shape(shape: Sequence[int], spacing: Sequence[float], target: float) -> tuple[int, int, int]:
    return tuple(max(1, round(n * s / target)) for n, s in zip(shape, spacing))  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------- one case


def _load_nifti(path: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine)`` of a NIfTI file; any reader error becomes a one-line :class:`CaseError`."""
    import nibabel as nib

    try:
        img = nib.load(str(path), mmap=False)
        data = np.asarray(np.asanyarray(img.dataobj))
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as err:  # nibabel, gzip, zlib, EOF and OS errors all mean "cannot read this file"
        raise CaseError(case, f"cannot read {path} ({type(err).__name__}: {err})") from None
    return data, affine


def _squeeze_to(data: np.ndarray, ndim: int) -> np.ndarray:
    while data.ndim > ndim and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def _read_channels(case: RawCase, n_channels: int) -> tuple[list[np.ndarray], np.ndarray, list[Path]]:
    """The case's channels (each 3-D), the affine of its first image file, and the file of each channel."""
    if case.channels_in_file:
        path = case.images[0]
        data, affine = _load_nifti(path, case.name)
        data = _squeeze_to(data, 4 if n_channels > 1 else 3)
        if n_channels == 1 and data.ndim == 3:
            return [data], affine, [path]
        if data.ndim != 4 or data.shape[3] != n_channels:
            raise CaseError(
                case.name,
                f"{path} has shape {data.shape} but dataset.json lists {n_channels} modalit(ies); expected a "
                + ("3-D image (X, Y, Z)" if n_channels == 1 else f"4-D image (X, Y, Z, {n_channels})"),
            )
        return [data[..., c] for c in range(n_channels)], affine, [path] * n_channels
    channels, affine = [], None
    for path in case.images:
        data, file_affine = _load_nifti(path, case.name)
        data = _squeeze_to(data, 3)
        if data.ndim != 3:
            raise CaseError(case.name, f"{path} has shape {data.shape}; expected a 3-D image (X, Y, Z)")
        if channels and data.shape != channels[0].shape:
            raise CaseError(
                case.name,
                f"{path} has shape {data.shape} but {case.images[0]} has shape {channels[0].shape}; expected the "
                "channels of a case to share one grid",
            )
        affine = file_affine if affine is None else affine
        channels.append(data)
    return channels, affine, list(case.images)  # type: ignore[return-value]


def prepare_case(
    case: RawCase,
    dataset: RawDataset,
    options: PrepareOptions,
    ct_properties: Sequence[Mapping[str, float]] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Read, check, optionally crop, normalise, remap and optionally resample one case.

    Args:
        case: the case's files (from :func:`read_raw_dataset`).
        dataset: the dataset it belongs to (channels, labels).
        options: :class:`PrepareOptions`.
        ct_properties: per channel, the statistics of :func:`ct_intensity_properties`; required for
            ``normalisation="ct"``.

    Returns:
        ``(image, label, attrs)``: ``image`` float32 (D, H, W) for one channel, (C, D, H, W) for several, in
        ``dataset.channel_names`` order; ``label`` uint8 (D, H, W) with values ``0 .. K-1``, or None for an
        unlabelled case; ``attrs``: ``case``, ``source_layout``, ``source_files``, ``labelled``,
        ``channel_names`` and ``labels`` (JSON strings: the list, and ``{name: class index}``), ``original_shape``,
        ``original_affine`` and ``original_spacing`` of the files, ``bbox_start`` / ``bbox_stop_exclusive`` (the
        stored box in file voxels: the whole volume without ``crop``), ``shape``, ``spacing`` and ``affine``
        (voxel -> world, 4x4) of the stored arrays, ``resampled``, ``target_spacing``, ``normalisation``,
        ``axis_order`` (``"xyz"``) and ``format_version``.

    Raises:
        CaseError: a problem found while listing the files, an unreadable file, a channel count that differs from
            ``dataset.json``, differing shapes (channels of one case, or image vs label), NaN/inf intensities, a
            channel that cannot be z-scored, or a label value not in ``dataset.json``'s ``labels``.
        ValueError: for ``normalisation="ct"`` without ``ct_properties``.
    """
    if options.normalisation == "ct" and (ct_properties is None or len(ct_properties) != len(dataset.channel_names)):
        raise ValueError("normalisation='ct' needs ct_properties, one mapping per channel (ct_intensity_properties)")
    if case.problem is not None:
        raise CaseError(case.name, case.problem)
    channels, affine, channel_files = _read_finite_channels(case, len(dataset.channel_names))
    shape = channels[0].shape
    label = _read_remapped_label(case, dataset, shape, channel_files[0])
    bbox = _stored_box(case.name, channels, label, options.crop, channel_files[0])
    box = tuple(slice(a, b) for a, b in bbox)
    image = _normalise_channels(case, dataset, options, ct_properties, channels, channel_files, box)
    del channels
    if label is not None:
        label = label[box]
    box_shape = image.shape[-3:]
    if options.spacing is not None:
        spacing_in = np.linalg.norm(affine[:3, :3], axis=0)
        target = _target_shape(box_shape, spacing_in, options.spacing)
        image = resample_to_shape(image, target, order=1).astype(np.float32)
        if label is not None:
            label = resample_to_shape(label, target, order=0).astype(np.uint8)
    out_affine = stored_affine(affine, [a for a, _ in bbox], box_shape, image.shape[-3:])
    attrs = _case_attrs(case, dataset, options, ct_properties, channel_files, shape, affine, bbox, image, out_affine)
    return np.ascontiguousarray(image), None if label is None else np.ascontiguousarray(label), attrs


def _read_finite_channels(case: RawCase, n_channels: int) -> tuple[list[np.ndarray], np.ndarray, list[Path]]:
    """:func:`_read_channels`, refusing NaN/inf intensities."""
    channels, affine, channel_files = _read_channels(case, n_channels)
    for path, data in zip(channel_files, channels):
        if np.issubdtype(data.dtype, np.inexact):
            bad = int(np.count_nonzero(~np.isfinite(data)))
            if bad:
                raise CaseError(case.name, f"{path} has {bad} NaN/inf voxels; expected finite intensities")
    return channels, affine, channel_files


def _read_label_on_grid(case: RawCase, label_path: Path, shape: tuple[int, ...], image_path: Path) -> np.ndarray:
    """The raw label file, squeezed to 3-D, checked to lie on the image grid ``shape`` (of ``image_path``)."""
    raw_label, _ = _load_nifti(label_path, case.name)
    raw_label = _squeeze_to(raw_label, 3)
    if raw_label.shape != shape:
        raise CaseError(
            case.name,
            f"{label_path} has shape {raw_label.shape} but {image_path} has shape {shape}; expected the "
            "label on the image grid",
        )
    return raw_label


def _read_remapped_label(
    case: RawCase, dataset: RawDataset, shape: tuple[int, ...], image_path: Path
) -> np.ndarray | None:
    """The case's label remapped to ``0 .. K-1`` (:func:`remap_labels`), or None for an unlabelled case."""
    if case.label is None:
        return None
    raw_label = _read_label_on_grid(case, case.label, shape, image_path)
    label, unknown = remap_labels(raw_label, dataset.labels)
    if unknown:
        shown = ", ".join(f"{v:g}" for v in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        known = ", ".join(str(v) for _, v in dataset.labels)
        raise CaseError(
            case.name,
            f"{case.label} has label values {shown}; expected only the values of dataset.json labels ({known})",
        )
    return label


def _stored_box(
    name: str, channels: Sequence[np.ndarray], label: np.ndarray | None, crop: bool, image_path: Path
) -> BBox:
    """The box of file voxels that is stored: the nonzero box of the image and label with ``crop``, else all."""
    shape = channels[0].shape
    if not crop:
        return ((0, shape[0]), (0, shape[1]), (0, shape[2]))
    mask = np.zeros(shape, dtype=bool)
    for data in channels:
        mask |= data != 0
    if label is not None:
        mask |= label != 0  # never crop labelled voxels away
    if not mask.any():
        raise CaseError(name, f"{image_path} is all zero; expected nonzero voxels to crop to (--crop)")
    return nonzero_bbox(mask)


def _normalise_channels(
    case: RawCase,
    dataset: RawDataset,
    options: PrepareOptions,
    ct_properties: Sequence[Mapping[str, float]] | None,
    channels: Sequence[np.ndarray],
    channel_files: Sequence[Path],
    box: tuple[slice, ...],
) -> np.ndarray:
    """Crop each channel to ``box`` and normalise it; float32 (D, H, W), or (C, D, H, W) for several channels."""
    normalised = []
    for c, (path, data) in enumerate(zip(channel_files, channels)):
        cropped = data[box]
        if options.normalisation == "zscore":
            try:
                normalised.append(zscore_foreground(cropped))
            except ValueError as err:
                which = f" (channel {c}, {dataset.channel_names[c]})" if case.channels_in_file else ""
                raise CaseError(case.name, f"{path}{which} {err}") from None
        elif options.normalisation == "ct":
            normalised.append(ct_normalise(cropped, ct_properties[c]))  # type: ignore[index]
        else:
            normalised.append(np.asarray(cropped, dtype=np.float32))
    return np.stack(normalised) if len(normalised) > 1 else normalised[0]


def _case_attrs(
    case: RawCase,
    dataset: RawDataset,
    options: PrepareOptions,
    ct_properties: Sequence[Mapping[str, float]] | None,
    channel_files: Sequence[Path],
    shape: tuple[int, ...],
    affine: np.ndarray,
    bbox: BBox,
    image: np.ndarray,
    out_affine: np.ndarray,
) -> dict[str, Any]:
    """The attributes of the output file (see :func:`prepare_case`)."""
    attrs: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "case": case.name,
        "source_layout": dataset.layout,
        "source_files": [str(p.relative_to(dataset.root)) if _is_below(p, dataset.root) else str(p)
                         for p in (*dict.fromkeys(channel_files), *([case.label] if case.label else []))],
        "labelled": case.label is not None,
        "channel_names": json.dumps(list(dataset.channel_names)),
        "labels": json.dumps(dataset.label_indices),
        "original_shape": np.asarray(shape, dtype=np.int64),
        "original_affine": np.asarray(affine, dtype=np.float64),
        "original_spacing": np.asarray(np.linalg.norm(affine[:3, :3], axis=0), dtype=np.float64),
        "bbox_start": np.asarray([a for a, _ in bbox], dtype=np.int64),
        "bbox_stop_exclusive": np.asarray([b for _, b in bbox], dtype=np.int64),
        "cropped": bool(options.crop),
        "axis_order": "xyz",
        "shape": np.asarray(image.shape[-3:], dtype=np.int64),
        "spacing": np.linalg.norm(out_affine[:3, :3], axis=0),
        "affine": out_affine,
        "resampled": options.spacing is not None,
        "target_spacing": options.spacing,
        "normalisation": options.normalisation,
    }
    if options.normalisation == "ct":
        attrs["ct_properties"] = json.dumps([dict(p) for p in ct_properties])  # type: ignore[union-attr]
    return attrs


def _is_below(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def ct_foreground_samples(case: RawCase, dataset: RawDataset, seed: int, max_samples: int) -> list[np.ndarray]:
    """Per channel, up to ``max_samples`` intensities of the case's labelled voxels (label > 0), drawn with ``seed``.

    Raises:
        CaseError: as :func:`prepare_case` for the files (an unlabelled case gives empty samples).
    """
    if case.problem is not None:
        raise CaseError(case.name, case.problem)
    if case.label is None:
        return [np.empty(0, dtype=np.float32) for _ in dataset.channel_names]
    channels, _, files = _read_channels(case, len(dataset.channel_names))
    raw_label = _read_label_on_grid(case, case.label, channels[0].shape, files[0])
    where = np.flatnonzero(raw_label.ravel() > 0)
    if where.size > max_samples:
        where = np.sort(np.random.default_rng(seed).choice(where, size=max_samples, replace=False))
    return [np.asarray(data.ravel()[where], dtype=np.float32) for data in channels]


def ct_samples_per_case(num_cases: int) -> int:
    """Foreground voxels drawn per case for the CT statistics: 10^7 over the training set, at least 1000."""
    return max(_CT_SAMPLES_MIN_PER_CASE, _CT_SAMPLES_TOTAL // max(1, num_cases))


# ------------------------------------------------------------------------------------------------------- h5 io


def write_prepared_case(
    path: PathLike, image: np.ndarray, label: np.ndarray | None, attrs: Mapping[str, Any], compression: str = "gzip"
) -> Path:
    """Write one case atomically: ``image`` float32, ``label`` uint8 when given (none for an unlabelled case).

    A labelled case goes through :func:`dataloaders.preprocess.write_case_h5`; an unlabelled one is built the same
    way (in memory, then one atomic write), without a ``label`` dataset. None-valued attributes are left out.

    Raises:
        ValueError: if the spatial shapes differ.
        OSError: if the file cannot be written; nothing is left at ``path``.
    """
    if label is not None:
        return write_case_h5(path, image, label, attrs, compression=compression)
    image = np.asarray(image, dtype=np.float32)
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be (D, H, W) or (C, D, H, W), got shape {image.shape}")
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.create_dataset("image", data=image, compression=compression)
        for key, value in attrs.items():
            if value is not None:
                f.attrs[key] = value
    path = Path(path)
    atomic_write_bytes(path, buffer.getbuffer())
    return path


def prepare_case_to_h5(
    case: RawCase,
    dataset: RawDataset,
    options: PrepareOptions,
    data_dir: PathLike,
    ct_properties: Sequence[Mapping[str, float]] | None = None,
) -> Path:
    """:func:`prepare_case`, then :func:`write_prepared_case` to ``<data_dir>/<case>.h5``.

    Raises:
        CaseError: on bad input (nothing is written).
        OutputError: when the file cannot be written (no file, not even a partial one, is left).
    """
    image, label, attrs = prepare_case(case, dataset, options, ct_properties)
    path = Path(data_dir) / f"{case.name}.h5"
    try:
        return write_prepared_case(path, image, label, attrs)
    except OSError as err:
        if is_no_space_error(err):
            raise OutputError(f"{case.name}: no space left on device while writing {path}") from None
        reason = (err.strerror or str(err)).lower()
        raise OutputError(f"{case.name}: cannot write {path} ({reason})") from None


def try_prepare_case(
    case: RawCase,
    dataset: RawDataset,
    options: PrepareOptions,
    data_dir: PathLike,
    ct_properties: Sequence[Mapping[str, float]] | None = None,
) -> CaseOutcome:
    """:func:`prepare_case_to_h5` that reports a bad case as ``status="failed"`` with a one-line message.

    :class:`OutputError` is raised: a full disk or an unwritable folder concerns every case that follows.
    """
    try:
        prepare_case_to_h5(case, dataset, options, data_dir, ct_properties)
        return CaseOutcome(case.name, "written", case.labelled, "")
    except OutputError:
        raise
    except CaseError as err:
        return CaseOutcome(case.name, "failed", case.labelled, str(err))
    except Exception as err:  # anything else still gives one line naming the case
        message = str(CaseError(case.name, f"{type(err).__name__}: {err}"))
        return CaseOutcome(case.name, "failed", case.labelled, message)


# ---------------------------------------------------------------------------------------------------- workers

_T = TypeVar("_T")


def run_in_workers(fn: Callable[..., _T], calls: Sequence[tuple[Any, ...]], workers: int = 1) -> Iterator[_T]:
    """Yield ``fn(*args)`` for each ``args`` of ``calls``: in order with one worker, as they finish with more.

    Worker processes are spawned (the same behaviour on every platform, no fork of a threaded process) and end
    with this process, even when it is killed (``utils.process.exit_with_parent``). Closing the generator early
    cancels the calls not started yet.
    """
    if workers <= 1 or len(calls) <= 1:
        for args in calls:
            yield fn(*args)
        return
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(calls)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=exit_with_parent,
        initargs=(os.getpid(),),
    )
    try:
        futures = [pool.submit(fn, *args) for args in calls]
        for future in as_completed(futures):
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

