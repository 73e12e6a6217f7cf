"""Tiny raw datasets in the nnU-Net v2 and MSD layouts, and a Pancreas-CT-like pair, for the preparation tests.

Import in a test as ``from synthetic_raw import write_nnunet_raw`` (``tests/`` is on ``sys.path`` because
``tests/conftest.py`` lives there).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["AFFINE", "SHAPE", "case_arrays", "write_msd_raw", "write_nifti", "write_nnunet_raw"]

SHAPE = (20, 18, 16)
AFFINE = np.array([[-1.5, 0.0, 0.0, 10.0], [0.0, 1.2, 0.0, -5.0], [0.0, 0.0, 2.0, 3.0], [0.0, 0.0, 0.0, 1.0]])
LABELS = {"background": 0, "tumour": 1, "edema": 2}


def case_arrays(
    seed: int, channels: int = 2, shape: Sequence[int] = SHAPE, values: Sequence[int] = (0, 1, 2)
) -> tuple[list[np.ndarray], np.ndarray]:
    """Channels (float32, zero outside an ellipsoid body, channel ``c`` around ``100 * (c + 1)``) and a label map
    (int16) with ``values[1]`` in a core blob and ``values[2]`` in a shell around it."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centre = np.asarray(shape) / 2.0
    body = sum(((g - c) / (0.42 * n)) ** 2 for g, c, n in zip(grid, centre, shape)) <= 1
    images = []
    for c in range(channels):
        data = rng.normal(100.0 * (c + 1), 10.0 + 5 * c, size=shape).astype(np.float32)
        data[~body] = 0
        images.append(data)
    r = np.sqrt(sum((g - c - (1 if i == 0 else 0)) ** 2 for i, (g, c) in enumerate(zip(grid, centre))))
    label = np.select([r <= 2, r <= 3.5], [values[1], values[2]], values[0]).astype(np.int16)
    return images, label


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def write_nnunet_raw(
    root: Path,
    labelled: Sequence[str] = ("case_a", "case_b", "case_c"),
    unlabelled: Sequence[str] = ("case_u",),
    extra_unlabelled: Sequence[str] = (),
    channel_names: Mapping[str, str] | None = None,
    labels: Mapping[str, object] | None = None,
    seed: int = 0,
) -> Path:
    """nnU-Net v2 raw folder: ``labelled`` cases with labels, ``unlabelled`` ones in imagesTr without a label,
    ``extra_unlabelled`` ones in imagesUnlabelled/. Label values follow the order of ``labels``' values."""
    channel_names = dict(channel_names or {"0": "T2", "1": "ADC"})
    labels = dict(labels or LABELS)
    values = [v for v in labels.values() if isinstance(v, int)][:3]
    meta = {
        "name": "Synthetic",
        "channel_names": channel_names,
        "labels": labels,
        "numTraining": len(labelled),
        "file_ending": ".nii.gz",
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    (root / "imagesTr").mkdir(exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    names = [(n, "imagesTr", True) for n in labelled] + [(n, "imagesTr", False) for n in unlabelled]
    names += [(n, "imagesUnlabelled", False) for n in extra_unlabelled]
    for i, (name, folder, has_label) in enumerate(names):
        images, label = case_arrays(seed + i, len(channel_names), values=values)
        for c, data in enumerate(images):
            write_nifti(root / folder / f"{name}_{c:04d}.nii.gz", data)
        if has_label:
            write_nifti(root / "labelsTr" / f"{name}.nii.gz", label)
    return root


def write_msd_raw(
    root: Path,
    labelled: Sequence[str] = ("prostate_00", "prostate_01", "prostate_02"),
    unlabelled: Sequence[str] = (),
    modalities: Mapping[str, str] | None = None,
    seed: int = 0,
) -> Path:
    """MSD task folder: 4-D ``(X, Y, Z, C)`` images (3-D for one modality), labels 0/1/2, the ``training`` list;
    ``unlabelled`` cases are images in imagesTr that are not listed and have no label."""
    modalities = dict(modalities or {"0": "T2", "1": "ADC"})
    meta = {
        "name": "Prostate",
        "modality": modalities,
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "numTraining": len(labelled),
        "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in labelled],
        "test": [],
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for i, name in enumerate([*labelled, *unlabelled]):
        images, label = case_arrays(seed + i, len(modalities))
        stacked = np.stack(images, axis=-1) if len(images) > 1 else images[0]
        write_nifti(root / "imagesTr" / f"{name}.nii.gz", stacked)
        if name in labelled:
            write_nifti(root / "labelsTr" / f"{name}.nii.gz", label)
    (root / "imagesTr" / "._prostate_00.nii.gz").write_bytes(b"macOS resource fork")  # as in the MSD archives
    return root
