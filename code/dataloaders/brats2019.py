"""Datasets stored as one HDF5 file per case: :class:`CaseDataset` for every layout of ``dataloaders.datasets``, and
:class:`BraTS2019` (SPEC section 1), its BraTS layout.

Layout under ``base_dir`` for BraTS2019::

    train.txt, val.txt, test.txt       one case name per line (CRLF and blank lines tolerated)
    data/<case>.h5                     datasets 'image' (float32, (D, H, W)) and 'label' (uint8, same shape)

The original import path keeps working: ``from dataloaders.brats2019 import BraTS2019, RandomCrop, RandomRotFlip,
ToTensor, TwoStreamBatchSampler, CenterCrop``; the transforms live in ``dataloaders.transforms`` and the sampler in
``dataloaders.samplers``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Union

import h5py
import numpy as np
from torch.utils.data import Dataset

from dataloaders.datasets import DatasetLayout, dataset_layout
from dataloaders.samplers import TwoStreamBatchSampler, grouper, iterate_eternally, iterate_once
from dataloaders.transforms import (
    CenterCrop,
    Compose,
    RandomCrop,
    RandomIntensity,
    RandomNoise,
    RandomRotFlip,
    RandomRotFlipCrop,
    ToTensor,
)

__all__ = [
    "BraTS2019",
    "CaseDataset",
    "CenterCrop",
    "Compose",
    "RandomCrop",
    "RandomIntensity",
    "RandomNoise",
    "RandomRotFlip",
    "RandomRotFlipCrop",
    "ToTensor",
    "TwoStreamBatchSampler",
    "grouper",
    "iterate_eternally",
    "iterate_once",
    "read_split_file",
]

PathLike = Union[str, "os.PathLike[str]"]
Sample = Dict[str, Any]


def read_split_file(path: PathLike) -> List[str]:
    """Case names listed in a split file, one per line; surrounding whitespace (CR included) and blank lines dropped.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if a name is listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    seen: set[str] = set()
    duplicates = []
    for name in names:
        if name in seen:
            duplicates.append(name)
        seen.add(name)
    if duplicates:
        raise ValueError(f"split file {path} lists {len(duplicates)} case(s) more than once, e.g. {duplicates[0]!r}")
    return names


class CaseDataset(Dataset):
    """Pre-processed cases of one split of a dataset layout (``dataloaders.datasets``): image and label per case.

    Each HDF5 file is opened inside ``__getitem__`` and closed before it returns, so the dataset holds no open handle
    and pickles into DataLoader workers. With a plain :class:`RandomCrop` or :class:`RandomRotFlipCrop` as the
    transform, or a ``Compose`` whose first transform is one, only the patch's box is read from disk (the same draws,
    hence the same patch, as a full read).

    Args:
        base_dir: the dataset's root folder.
        split: split name (``'train'``, ``'val'``, ``'test'``, ``'unlabeled'``); its list file comes from ``layout``.
        num: keep only the first ``num`` names of the split (all when ``None``).
        transform: callable on the sample dict, e.g. ``Compose([RandomRotFlip(), RandomCrop(patch), ToTensor()])``.
        layout: a :class:`~dataloaders.datasets.DatasetLayout` or its ``--dataset`` name. Default ``"brats2019"``.
        names: the case names to serve instead of the split list's (e.g. training's labelled and unlabelled cases).
        labelled: only the first ``labelled`` names are read with their label; the others are served without a
            ``'label'`` entry and their files need none. None (default): every case is labelled.
        split_dir: folder of the split lists, when not ``base_dir``.

    Returns (``__getitem__``):
        ``{'image': (D, H, W) or (C, D, H, W) float32, 'label': (D, H, W) uint8, 'name': str}`` before
        ``transform`` (no ``'label'`` for an unlabelled case); after it, whatever the transform returns (``'name'``
        is added back when the transform dropped it).

    Raises:
        FileNotFoundError: the split file or one of its listed ``data/<case>.h5`` files is missing (checked here, not
            at the first access).
        ValueError: ``num`` is not a positive int, or is larger than the split; at access, a file lacks the ``image``
            or ``label`` dataset or their shapes disagree.
    """

    def __init__(
        self,
        base_dir: PathLike,
        split: str = "train",
        num: int | None = None,
        transform: Callable[[Sample], Any] | None = None,
        layout: DatasetLayout | str = "brats2019",
        names: List[str] | None = None,
        labelled: int | None = None,
        split_dir: PathLike | None = None,
    ) -> None:
        if not isinstance(split, str) or not split or os.sep in split or "/" in split:
            raise ValueError(f"split must be a split-file name such as 'train', 'val' or 'test', found {split!r}")
        self.layout = dataset_layout(layout) if isinstance(layout, str) else layout
        self._base_dir = Path(base_dir)
        self.split = split
        self.transform = transform
        split_file = self.layout.split_path(self._base_dir, split, split_dir)
        names = read_split_file(split_file) if names is None else list(names)
        self.labelled = len(names) if labelled is None else int(labelled)
        if num is not None:
            if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num <= 0:
                raise ValueError(f"num must be a positive int or None, found {num!r}")
            if num > len(names):
                raise ValueError(f"num={num} but {split_file} lists only {len(names)} cases")
            names = names[:num]
        self.image_list = names  # the original attribute name
        missing = [p for p in map(self.path_of, names) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} case file(s) listed in {split_file} not found, first: {missing[0]}"
            )

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def path_of(self, name: str) -> Path:
        """The case file of ``name`` (``<base_dir>/data/<name>.h5`` for BraTS2019)."""
        return self.layout.case_path(self._base_dir, name)

    def __len__(self) -> int:
        return len(self.image_list)

    def __getitem__(self, idx: int) -> Any:
        name = self.image_list[idx]
        path = self.path_of(name)
        crop, rest = self._leading_random_crop()
        try:
            h5 = h5py.File(path, "r")
        except FileNotFoundError:
            raise FileNotFoundError(f"case file not found: {path}") from None
        except OSError as err:
            raise OSError(f"cannot open {path} as HDF5: {err}") from err
        with h5:
            arrays = self._datasets(h5, path, with_label=idx < self.labelled)
            if crop is not None:
                params = crop.get_params(arrays["image"].shape[-3:])
                sample: Sample = {key: crop.read(ds, params) for key, ds in arrays.items()}
            else:
                sample = {key: ds[()] for key, ds in arrays.items()}
            sample["name"] = name
        if rest is not None:
            sample = rest(sample)
        if isinstance(sample, dict):
            sample.setdefault("name", name)
        return sample

    def _leading_random_crop(self) -> tuple:
        """``(crop, rest)`` when the transform starts with a patch reader (:class:`RandomCrop`,
        :class:`RandomRotFlipCrop`), else ``(None, transform)``."""
        readers = (RandomCrop, RandomRotFlipCrop)
        t = self.transform
        if type(t) in readers:
            return t, None
        inner = getattr(t, "transforms", None)
        if isinstance(inner, (list, tuple)) and inner and type(inner[0]) in readers:
            return inner[0], (Compose(inner[1:]) if len(inner) > 1 else None)
        return None, t

    @staticmethod
    def _datasets(h5: h5py.File, path: Path, with_label: bool = True) -> dict[str, h5py.Dataset]:
        keys = ("image", "label") if with_label else ("image",)
        for key in keys:
            if key not in h5 or not isinstance(h5[key], h5py.Dataset):
                raise ValueError(f"{path} has no '{key}' dataset (found: {sorted(h5.keys())})")
        arrays = {key: h5[key] for key in keys}
        image_ds, label_ds = arrays["image"], arrays.get("label")
        if image_ds.ndim not in (3, 4) or (
            label_ds is not None and (label_ds.ndim != 3 or image_ds.shape[-3:] != label_ds.shape)
        ):
            found = f"image {image_ds.shape}" + (f" and label {label_ds.shape}" if label_ds is not None else "")
            raise ValueError(f"{path}: {found} must share one (D, H, W) shape (image (D, H, W) or (C, D, H, W))")
        return arrays

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_dir={str(self._base_dir)!r}, split={self.split!r}, cases={len(self)})"


class BraTS2019(CaseDataset):
    """Pre-processed BraTS2019 cases: :class:`CaseDataset` of the ``brats2019`` layout (the original class name).

    Args:
        base_dir: folder holding ``<split>.txt`` and ``data/``.
        split, num, transform, names, labelled: as :class:`CaseDataset`.
    """

    def __init__(
        self,
        base_dir: PathLike,
        split: str = "train",
        num: int | None = None,
        transform: Callable[[Sample], Any] | None = None,
        names: List[str] | None = None,
        labelled: int | None = None,
    ) -> None:
        super().__init__(base_dir, split, num, transform, "brats2019", names, labelled)
