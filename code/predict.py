"""Segment the whole tumour in new scans that were never preprocessed, in the scan's own space.

Run from ``code/``::

    python predict.py --input BraTS19_XYZ_1/ --output xyz_seg.nii.gz --pretrained 50
    python predict.py --input flair.nii.gz --output seg.nii.gz --checkpoint my.pth --uncertainty unc.nii.gz --tta
    python predict.py --input BraTS19_XYZ_1/ --modalities flair t1 t1ce t2 --output seg.nii.gz --checkpoint 4ch.pth
    python predict.py --input flair.nii.gz t2.nii.gz --modalities flair t2 --output seg.nii.gz --checkpoint 2ch.pth

``--modalities`` (default ``flair``, as published) are the network's input channels in order, as given to
``preprocess_brats2019.py --modalities`` for training; the network gets that many input channels. ``--input`` is a
BraTS-layout case folder (its ``*_<modality>.nii[.gz]`` file for each modality; see :func:`find_modality`) or one
NIfTI file per modality, in the order of ``--modalities``, of any size and orientation; several files must share
one voxel grid (same shape and affine). The scans go through the training preprocessing (SPEC section 1) on the
way in and every step is undone on the way out:

1. reorient to the axes the BraTS data is stored in (voxel axes pointing L, P, S, as the released 240x240x155
   files) by flips and axis permutations only (``nibabel.orientations``; exact, no interpolation);
2. crop to the bounding box of the voxels nonzero in any channel (as ``dataloaders.preprocess.preprocess_case``);
   per channel, clip above the 99.9th percentile and z-score with the brain voxels
   (``dataloaders.preprocess.normalise_intensity``); the channels are stacked (C, D, H, W);
3. resample to ``--spacing`` mm (default 1, the training grid; linear) when the voxels differ from it;
4. sliding-window prediction (``engine.evaluate.predict_case``); with resampling, the class probabilities are
   resampled back (linear) before the argmax;
5. paste into the uncropped grid, undo the reorientation, and save with the input's affine and its qform/sform.

The segmentation is written as uint8 (0 background, 1 tumour), the optional uncertainty (entropy of the mean
MC-dropout softmax, ``--mc_passes`` passes) as float32, both in the input's voxel grid (that of the first
modality's file), so they overlay on the input in ITK-SNAP or 3D Slicer. Files are written atomically. Exit
status: 0 on success, 1 on a missing or unreadable input, a folder without one of the modalities, input files
that are not one per modality or differ in shape or affine, a missing or unfitting checkpoint (e.g. trained on
other channels), an output that cannot be written (checked before predicting) or that would overwrite an input
(one line on stderr), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Union

import numpy as np
import torch
from torch import nn

import speed
from dataloaders.preprocess import MODALITIES, nonzero_bbox, normalise_intensity, resample_to_shape
from engine.evaluate import keep_largest_component
from engine.prediction import SlidingWindow, add_prediction_arguments, predict_case, window_from_args
from networks.net_factory_3d import NETWORKS_3D, net_factory_3d, width_kwargs
from utils.atomic import atomic_path, check_writable
from utils.checkpoint import (
    PUBLISHED_CHECKPOINTS,
    CheckpointError,
    CheckpointNotFoundError,
    load_weights,
    published_checkpoint_path,
)
from utils.device import get_device

__all__ = [
    "TRAINING_AXCODES",
    "InputError",
    "Segmentation",
    "find_flair",
    "find_inputs",
    "find_modality",
    "load_channels",
    "load_flair",
    "main",
    "segment_volume",
    "write_like",
]

PathLike = Union[str, "os.PathLike[str]"]

TRAINING_AXCODES: tuple[str, str, str] = ("L", "P", "S")
"""Where the voxel axes of the BraTS files (and so of the training arrays) point: x to the left, y posterior,
z superior (``nibabel.aff2axcodes`` of the released 240x240x155 volumes)."""

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_SPACING_RTOL = 1e-3
_AFFINE_ATOL = 1e-4  # mm: the files of one case share their affine up to the header's float32 rounding


class InputError(ValueError):
    """A problem with the input scan or folder; the message names the path."""


class Segmentation(NamedTuple):
    """What :func:`segment_volume` returns, both in the input's voxel grid.

    Attributes:
        labels: (X, Y, Z) uint8 class map (0 background).
        uncertainty: (X, Y, Z) float32 entropy map (0 outside the brain box), or None.
    """

    labels: np.ndarray
    uncertainty: np.ndarray | None


# ---------------------------------------------------------------------------------------------------- input


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI_SUFFIXES)


def find_flair(path: PathLike) -> Path:
    """The FLAIR file to segment: ``path`` itself, or the one ``*flair*.nii[.gz]`` file in a case folder.

    In a folder, ``<folder name>_flair.nii[.gz]`` (BraTS naming) is preferred; otherwise exactly one file whose name
    contains ``flair`` (any case) must be there.

    Raises:
        InputError: if ``path`` does not exist, is a file that is not ``.nii``/``.nii.gz``, or a folder without
            exactly one FLAIR NIfTI.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    if path.is_file():
        return _nifti_file(path)
    niftis = _niftis_in(path)
    for suffix in _NIFTI_SUFFIXES:
        preferred = path / f"{path.name}_flair{suffix}"
        if preferred.is_file():
            return preferred
    flairs = [p for p in niftis if "flair" in p.name.lower()]
    if len(flairs) == 1:
        return flairs[0]
    if not flairs:
        found = ", ".join(p.name for p in niftis[:6]) or "no NIfTI file"
        raise InputError(f"no FLAIR NIfTI (*flair*.nii.gz) in folder {path}; found {found}")
    raise InputError(f"folder {path} holds several FLAIR files ({', '.join(p.name for p in flairs)}); pass one")


def find_modality(folder: PathLike, modality: str) -> Path:
    """The file of ``modality`` (``flair``, ``t1``, ``t1ce`` or ``t2``) in a case folder.

    ``<folder name>_<modality>.nii[.gz]`` (BraTS naming) is preferred; otherwise exactly one NIfTI whose name ends
    in ``_<modality>.nii[.gz]`` (any case) must be there, so ``t1`` never takes the ``_t1ce`` file. FLAIR keeps the
    rule of :func:`find_flair` (any one file whose name contains ``flair``).

    Raises:
        InputError: if ``folder`` is not a folder, or holds no such file or several (one line naming the folder and
            the modality).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"input {folder} is not a case folder")
    if modality == "flair":
        return find_flair(folder)
    for suffix in _NIFTI_SUFFIXES:
        preferred = folder / f"{folder.name}_{modality}{suffix}"
        if preferred.is_file():
            return preferred
    niftis = _niftis_in(folder)
    hits = [p for p in niftis if p.name.lower().endswith(tuple(f"_{modality}{s}" for s in _NIFTI_SUFFIXES))]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        found = ", ".join(p.name for p in niftis[:6]) or "no NIfTI file"
        raise InputError(f"no {modality} NIfTI (*_{modality}.nii.gz) in folder {folder}; found {found}")
    raise InputError(f"folder {folder} holds several {modality} files ({', '.join(p.name for p in hits)}); "
                     "pass the files with --input")


def find_inputs(inputs: Sequence[PathLike], modalities: Sequence[str] = ("flair",)) -> list[Path]:
    """The file of each modality, in the order of ``modalities``.

    ``inputs`` is one case folder (each modality found by :func:`find_modality`) or one NIfTI file per modality,
    in that order. With the default (FLAIR only) this is ``[find_flair(inputs[0])]``.

    Raises:
        InputError: on a missing input, a file that is not NIfTI, a folder without one of the modalities, a folder
            among several inputs, or a number of files that differs from the number of modalities.
        ValueError: if ``inputs`` or ``modalities`` is empty.
    """
    paths = [Path(p) for p in inputs]
    if not paths or not modalities:
        raise ValueError(f"give at least one input and one modality, got {len(paths)} and {len(modalities)}")
    for path in paths:
        if not path.exists():
            raise InputError(f"input {path} does not exist")
    if len(paths) == 1 and paths[0].is_dir():
        return [find_modality(paths[0], modality) for modality in modalities]
    if len(paths) != len(modalities):
        files = f"{len(paths)} input file" + ("s" if len(paths) != 1 else "")
        raise InputError(f"{files} for {len(modalities)} modalities ({' '.join(modalities)}): give one case folder "
                         "or one NIfTI file per modality, in the order of --modalities")
    for path in paths:
        if path.is_dir():
            raise InputError(f"input {path} is a folder: give one case folder alone, or one NIfTI file per modality")
        _nifti_file(path)
    return paths


def _nifti_file(path: Path) -> Path:
    if not _is_nifti(path):
        raise InputError(f"input {path} is not a NIfTI file (.nii or .nii.gz)")
    return path


def _niftis_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_nifti(p))


def load_flair(path: PathLike) -> tuple[Any, np.ndarray]:
    """Read a 3-D NIfTI: ``(nibabel image, float32 (X, Y, Z) data)``; a trailing axis of length 1 is dropped.

    Raises:
        InputError: if nibabel cannot read it, it is not 3-D, holds NaN/inf, or is all zero.
    """
    import nibabel as nib

    path = Path(path)
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel, gzip, zlib and OS errors all mean "cannot read this file"
        raise InputError(f"cannot read {path} as NIfTI ({type(err).__name__}: {_one_line(err)})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path} must be a 3-D volume, found shape {data.shape}")
    if not np.all(np.isfinite(data)):
        raise InputError(f"{path} holds {int(np.count_nonzero(~np.isfinite(data)))} NaN/inf voxels")
    if not np.any(data):
        raise InputError(f"{path} is all zero: nothing to segment")
    return image, data


def load_channels(paths: Sequence[PathLike]) -> tuple[Any, np.ndarray]:
    """Read the files of one case (:func:`load_flair` each): ``(the first file's image, data)``.

    ``data`` is float32 (X, Y, Z) for one file, (C, X, Y, Z) for several, stacked in the order given.

    Raises:
        InputError: as :func:`load_flair`, or when a file's shape or affine differs from the first file's (the
            message names both files).
        ValueError: if ``paths`` is empty.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no input file to read")
    reference, first = load_flair(paths[0])
    channels = [first]
    for path in paths[1:]:
        image, data = load_flair(path)
        if data.shape != first.shape:
            raise InputError(f"{path} has shape {data.shape} but {paths[0]} has shape {first.shape}; the modalities "
                             "of a case must share one voxel grid")
        if not np.allclose(image.affine, reference.affine, rtol=0, atol=_AFFINE_ATOL):
            raise InputError(f"{path} and {paths[0]} have different affines (voxel-to-world matrices); resample "
                             "the modalities onto one grid first")
        channels.append(data)
    return reference, (np.stack(channels) if len(channels) > 1 else first)


# ----------------------------------------------------------------------------------------------- geometry


def _orientation_transforms(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(to training axes, back to the input's axes) as nibabel orientation transforms."""
    from nibabel import orientations

    current = orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    target = orientations.axcodes2ornt(TRAINING_AXCODES)
    return orientations.ornt_transform(current, target), orientations.ornt_transform(target, current)


def _apply_orientation(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Flip/permute the last three axes of ``array`` (any leading axes kept); returns a contiguous copy."""
    from nibabel import orientations

    lead = array.ndim - 3
    if lead == 0:
        return np.ascontiguousarray(orientations.apply_orientation(array, transform))
    moved = np.moveaxis(array, tuple(range(lead)), tuple(range(-lead, 0)))
    out = orientations.apply_orientation(moved, transform)
    return np.ascontiguousarray(np.moveaxis(out, tuple(range(-lead, 0)), tuple(range(lead))))


def segment_volume(
    net: nn.Module,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    spacing: float | None = 1.0,
    window: SlidingWindow = SlidingWindow(),
    lcc: bool = False,
    device: torch.device | str | None = None,
) -> Segmentation:
    """Segment a raw volume (FLAIR, or several modalities as channels) and return the result in its own voxel grid.

    See the module docstring for the steps. The crop box covers the voxels nonzero in any channel, and each channel
    is normalised on its own (as the training preprocessing). A voxel outside the box is background
    (uncertainty 0).

    Args:
        net: segmentation network (logits or a tuple ending with them), e.g. ``unet_3D_dt``, with C input channels.
        data: (X, Y, Z) raw intensities in the file's voxel order, or (C, X, Y, Z) for C modalities (in the order
            the network was trained on); 0 = outside the (skull-stripped) brain.
        affine: its 4x4 voxel-to-world matrix (any orientation, any voxel size).
        spacing: isotropic grid in mm the network works on (default 1.0, the BraTS grid); None keeps the
            input's voxels. Voxels within 0.1 % of it are not resampled.
        window: the sliding-window settings (``mc_passes`` > 0 adds the uncertainty); see
            :func:`engine.prediction.predict_case`.
        device: where to run; default the network's device.
        lcc: keep only the largest connected tumour component. Default False.

    Returns:
        :class:`Segmentation` with arrays of ``data``'s spatial shape (X, Y, Z).

    Raises:
        ValueError: if ``data`` is not 3-D or 4-D or is all zero, a channel cannot be normalised (a constant brain),
            ``affine`` is not 4x4, or ``spacing`` is not positive.
    """
    data = np.asarray(data, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    if data.ndim not in (3, 4):
        raise ValueError(f"data must be (X, Y, Z) or (C, X, Y, Z), found shape {data.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, found shape {affine.shape}")
    if spacing is not None and not spacing > 0:
        raise ValueError(f"spacing must be a positive number of mm or None, found {spacing!r}")
    to_training, to_input = _orientation_transforms(affine)
    oriented = _apply_orientation(data, to_training)
    voxel_size = np.linalg.norm(affine[:3, :3], axis=0)[np.argsort(to_training[:, 0])]  # sizes along the new axes

    bbox = nonzero_bbox(oriented)  # over all channels
    box = tuple(slice(a, b) for a, b in bbox)
    image = _normalise_channels(oriented[(..., *box)])
    cropped_shape = image.shape[-3:]
    resample = spacing is not None and not np.allclose(voxel_size, spacing, rtol=_SPACING_RTOL, atol=0)
    if resample:
        grid_shape = tuple(max(1, round(n * s / spacing)) for n, s in zip(cropped_shape, voxel_size))
        image = resample_to_shape(image, grid_shape, order=1).astype(np.float32)

    labels, uncertainty, probabilities = predict_case(net, image, window, device)
    if resample:
        probabilities = resample_to_shape(probabilities, cropped_shape, order=1)
        labels = np.argmax(probabilities, axis=0).astype(np.uint8)
        if uncertainty is not None:
            uncertainty = resample_to_shape(uncertainty, cropped_shape, order=1)
    if lcc:
        labels = keep_largest_component(labels)

    full = np.zeros(oriented.shape[-3:], dtype=np.uint8)
    full[box] = labels
    labels_out = _apply_orientation(full, to_input)
    uncertainty_out = None
    if uncertainty is not None:
        full_unc = np.zeros(oriented.shape[-3:], dtype=np.float32)
        full_unc[box] = np.clip(uncertainty, 0.0, None)
        uncertainty_out = _apply_orientation(full_unc, to_input)
    if labels_out.shape != data.shape[-3:]:  # the transforms are inverse permutations; this would be a bug
        raise RuntimeError(f"mapped-back shape {labels_out.shape} differs from the input shape {data.shape[-3:]}")
    return Segmentation(labels_out, uncertainty_out)


def _normalise_channels(cropped: np.ndarray) -> np.ndarray:
    """:func:`normalise_intensity` of a (D, H, W) volume, or of each channel of a (C, D, H, W) one on its own."""
    if cropped.ndim == 3:
        return normalise_intensity(cropped)
    channels = []
    for index, channel in enumerate(cropped):
        try:
            channels.append(normalise_intensity(channel))
        except ValueError as err:
            raise ValueError(f"input channel {index + 1} of {len(cropped)}: {err}") from None
    return np.stack(channels)


# ------------------------------------------------------------------------------------------------- output


def write_like(path: PathLike, array: np.ndarray, reference: Any, dtype: Any) -> Path:
    """Save ``array`` as NIfTI with the reference image's affine, qform/sform codes and units, atomically.

    The reference header is copied (so ITK-SNAP aligns the two), with the data type set to ``dtype``, scaling
    reset (slope 1, intercept 0) and the display range cleared.

    Raises:
        InputError: if ``path`` does not end in ``.nii`` or ``.nii.gz``.
    """
    import nibabel as nib

    path = Path(path)
    if not _is_nifti(path):
        raise InputError(f"output {path} must end in .nii.gz or .nii")
    header = reference.header.copy() if isinstance(reference.header, nib.Nifti1Header) else None
    out = nib.Nifti1Image(np.asarray(array).astype(dtype), reference.affine, header=header)
    out.set_data_dtype(dtype)
    out.header.set_slope_inter(1.0, 0.0)
    out.header["cal_min"] = 0.0
    out.header["cal_max"] = 0.0
    if header is None:
        out.header.set_xyzt_units("mm")
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else ".nii"
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(out, str(tmp))
    return path


# ---------------------------------------------------------------------------------------------------- cli


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        description="Segment the whole tumour in a scan (BraTS case folder, or one NIfTI per modality) with a "
        "UG-MCL network; the output is in the input's own voxel grid and affine.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--input", required=True, nargs="+",
                        help="BraTS case folder (uses its *_<modality>.nii[.gz] files) or one .nii[.gz] per "
                             "modality, in the order of --modalities")
    parser.add_argument("--modalities", nargs="+", choices=MODALITIES, default=["flair"],
                        help="the network's input channels, in order (as preprocess_brats2019.py --modalities)")
    parser.add_argument("--output", required=True, help="segmentation to write (.nii.gz), uint8 0/1")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", default=None, help="weights file (plain state_dict or training checkpoint)")
    weights.add_argument(
        "--pretrained",
        type=int,
        choices=sorted(PUBLISHED_CHECKPOINTS),
        default=None,
        help="published UG-MCL weights trained with 25 or 50 labelled cases (see download_pretrained.py)",
    )
    parser.add_argument("--model_dir", default="../model", help="where --pretrained weights are looked for")
    parser.add_argument("--uncertainty", default=None, help="also write the MC-dropout uncertainty here (float32)")
    parser.add_argument("--mc_passes", type=int, default=8, help="MC-dropout passes for --uncertainty")
    parser.add_argument("--model", default="unet_3D_dt", choices=sorted(NETWORKS_3D), help="network name")
    parser.add_argument("--feature_scale", type=int, default=4, help="network width divisor, as in training (published: 4)")
    parser.add_argument("--num_classes", type=int, default=2, help="output classes")
    parser.add_argument("--spacing", type=float, default=1.0, help="grid (mm) the network runs on; 0 = keep input's")
    add_prediction_arguments(parser)
    speed.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Segment one scan; return the exit status (0 ok, 1 error with one line on stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mc_passes < 1:
        parser.error(f"--mc_passes must be >= 1, found {args.mc_passes}")
    if len(set(args.modalities)) != len(args.modalities):
        parser.error(f"--modalities must not repeat, found {' '.join(args.modalities)}")
    try:
        scans = find_inputs(args.input, args.modalities)
        for target in (args.output, args.uncertainty):
            if target is not None and not _is_nifti(Path(target)):
                raise InputError(f"output {target} must end in .nii.gz or .nii")
            if target is not None:
                check_writable(target)  # now, not after the whole prediction
                for scan in scans:
                    if _same_file(target, scan):
                        raise InputError(f"output {target} is the input scan {scan}; it would be overwritten")
        if args.uncertainty is not None and _same_file(args.uncertainty, args.output):
            raise InputError(f"--uncertainty and --output are the same file {args.output}; give two paths")
        reference, data = load_channels(scans)  # unreadable or mismatched scans: before the checkpoint is loaded
        if args.pretrained is not None:
            checkpoint = published_checkpoint_path(args.model_dir, args.pretrained)
            if not checkpoint.is_file():
                raise CheckpointNotFoundError(
                    f"published checkpoint {checkpoint} not found; download it first with: "
                    f"python download_pretrained.py --labeled_num {args.pretrained} --out_dir {args.model_dir}"
                )
        else:
            checkpoint = Path(args.checkpoint)
        device = get_device(args.device)
        window = dataclasses.replace(window_from_args(args), mc_passes=args.mc_passes if args.uncertainty else 0)
        net = net_factory_3d(args.model, in_chns=len(args.modalities), class_num=args.num_classes,
                             **width_kwargs(args.model, args.feature_scale))
        _load_weights_for(net, checkpoint, args.modalities)
        fast = speed.prepare_inference(net, speed.options_from_args(args), device)
        with fast.around_case():
            result = segment_volume(fast.net, data, reference.affine, spacing=args.spacing if args.spacing > 0 else None,
                                    window=window, lcc=args.lcc, device=device)
        write_like(args.output, result.labels, reference, np.uint8)
        if args.uncertainty and result.uncertainty is not None:
            write_like(args.uncertainty, result.uncertainty, reference, np.float32)
    except (InputError, CheckpointError, OSError, ValueError) as err:  # OSError: NotWritableError, a full disk
        print(f"error: {err}", file=sys.stderr)
        return 1
    tumour = int(np.count_nonzero(result.labels))
    print(f"{', '.join(str(scan) for scan in scans)} -> {args.output} ({tumour} tumour voxels)", file=sys.stderr)
    return 0


def _load_weights_for(net: nn.Module, checkpoint: Path, modalities: Sequence[str]) -> None:
    """``load_weights``; an error says how many input channels ``--modalities`` gave the network."""
    try:
        load_weights(net, checkpoint, map_location="cpu")
    except CheckpointNotFoundError:
        raise
    except CheckpointError as err:
        channels = f"{len(modalities)} input channel" + ("s" if len(modalities) != 1 else "")
        raise CheckpointError(f"{err} (the network has {channels}: --modalities {' '.join(modalities)})") from None


def _same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name the same file (links resolved; a missing file compares by its absolute path)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _one_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
