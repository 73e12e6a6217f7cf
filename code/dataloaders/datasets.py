"""The datasets training and testing know by name (``--dataset``): where the split lists and case files are, and the
papers' defaults for each.

Every layout stores one HDF5 file per case with an ``image`` dataset ((D, H, W) or (C, D, H, W) float32) and, for a
labelled case, a ``label`` dataset ((D, H, W) uint8, class indices). A split list names one case per line.

=============  =======================================================  ==============================================
``--dataset``  case file of ``<name>``                                  split lists
=============  =======================================================  ==============================================
``brats2019``  ``<root>/data/<name>.h5`` (``preprocess_brats2019.py``)  ``train.txt``, ``val.txt``, ``test.txt``
``folder``     ``<root>/data/<name>.h5`` (``prepare_dataset.py``)       the same, and ``unlabeled.txt``
``la``         ``<root>/2018LA_Seg_Training Set/<name>/mri_norm2.h5``   ``train.list``, ``test.list`` (UA-MT layout)
``pancreas``   ``<root>/Pancreas_h5/<name>_norm.h5``                    ``train.list``, ``test.list`` (MC-Net layout)
``coranet``    ``<root>/<name>``, a line naming the file (``0001.h5``)  ``{train_lab,train_unlab,test}.txt`` (CoraNet)
=============  =======================================================  ==============================================

The labelled training cases are the first ``--labeled_num`` names of the train list; the rest of it, and every case
of an ``unlabeled`` list, are unlabelled, and their label is never read (a case listed as unlabelled may have none).
A list that a layout does not have (``val`` of LA) is simply absent: training then keeps the last weights. The lists
may live in another folder than the cases (``--split_dir``), e.g. your own split of the shared LA samples.

``coranet`` is Pancreas-CT as CoraNet (Shi et al., TMI 2021) distributes it: its ``preprocess/pancreas_preprocess.py``
writes one flat ``<case number>.h5`` per case (``image`` and ``label``, (W, H, D), the CT clipped to [-125, 275] and
scaled to [0, 1]) and its ``split_file_path`` writes those file names, extension included, to ``train_lab.txt``
(labelled), ``train_unlab.txt`` (unlabelled) and ``test.txt``, which its ``dataset/pancreas.py`` joins to the data
folder. So a list line is the case file relative to ``--root_path`` (our assumption: no ``Pancreas_h5/..._norm.h5``
naming); the lists usually sit in CoraNet's ``data_lists/pancreas/`` (pass it as ``--split_dir``). ``train`` is
``train_lab.txt`` and ``unlabeled`` is ``train_unlab.txt``, so pass ``--labeled_num`` = the number of lines of
``train_lab.txt`` (the default, 12, fits a 20 % split of the 62 training cases; a larger value is refused, a smaller
one trains the rest of ``train_lab.txt`` as unlabelled).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

__all__ = ["DATASETS", "DatasetLayout", "dataset_layout"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class DatasetLayout:
    """Where a dataset's files are and what training defaults to on it.

    Attributes:
        name: the ``--dataset`` name.
        split_files: split name -> list file relative to the root (``"train"``, ``"val"``, ``"test"``,
            ``"unlabeled"``); a missing file is an empty split, except ``train``.
        case_pattern: the case file relative to the root, with ``{name}`` for the case name.
        defaults: ``TrainConfig`` values used where the option is not given (the papers' settings).
        models: the network a method trains on this dataset when ``--model`` is not given, by the method's usual
            one (e.g. ``{"unet_3D_dt": "vnet_dt"}``: the V-Net backbone of the LA papers).
        source: where the defaults come from.
        spacing: the voxel size in mm of case files that store no geometry (None: 1 mm, the BraTS grid).
        prepare: how to get the data into this layout, for the error message of a missing folder or list;
            ``{root}`` is replaced by the folder.
    """

    name: str
    split_files: Mapping[str, str]
    case_pattern: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    models: Mapping[str, str] = field(default_factory=dict)
    source: str = ""
    spacing: tuple[float, float, float] | None = None
    prepare: str = ("prepare the data with `python preprocess_brats2019.py --raw_dir RAW --out_dir {root}` (see "
                    "data/README.md) or run the synthetic demo with `make demo`")

    def split_path(self, root: PathLike, split: str, split_dir: PathLike | None = None) -> Path:
        """The list file of ``split`` in ``split_dir`` (default ``root``); ``<split>.txt`` for a split the layout
        does not name."""
        return Path(split_dir if split_dir is not None else root) / self.split_files.get(split, f"{split}.txt")

    def case_path(self, root: PathLike, name: str) -> Path:
        """The HDF5 file of case ``name`` under ``root``."""
        return Path(root) / self.case_pattern.format(name=name)


_CORANET_SPLITS = {"train": "train_lab.txt", "unlabeled": "train_unlab.txt", "test": "test.txt"}
_FOLDER_SPLITS = {"train": "train.txt", "val": "val.txt", "test": "test.txt", "unlabeled": "unlabeled.txt"}
_LIST_SPLITS = {"train": "train.list", "val": "val.list", "test": "test.list", "unlabeled": "unlabeled.list"}

DATASETS: dict[str, DatasetLayout] = {
    "brats2019": DatasetLayout(
        "brats2019", _FOLDER_SPLITS, "data/{name}.h5",
        defaults={"root_path": "../data/BraTS2019", "exp": "BraTs2019_UGMCL", "labeled_num": 50,
                  "patch_size": (96, 96, 96), "max_iterations": 30000, "lr_schedule": "constant"},
        source="the released UG-MCL code (BraTS2019, SPEC section 3)",
    ),
    "folder": DatasetLayout(
        "folder", _FOLDER_SPLITS, "data/{name}.h5",
        defaults={"exp": "Dataset_UGMCL", "labeled_num": 8, "patch_size": (96, 96, 96), "max_iterations": 30000,
                  "lr_schedule": "constant"},
        source="the BraTS2019 settings; a folder written by prepare_dataset.py (nnU-Net v2 or MSD raw data)",
        prepare="prepare it with `python prepare_dataset.py --raw_dir RAW --out_dir {root}` (nnU-Net v2 or MSD raw data)",
    ),
    "la": DatasetLayout(
        "la", _LIST_SPLITS, "2018LA_Seg_Training Set/{name}/mri_norm2.h5",
        defaults={"root_path": "../data/LA", "exp": "LA_UGMCL", "labeled_num": 16, "patch_size": (112, 112, 80),
                  "max_iterations": 6000, "lr_schedule": "step", "lr_step": 2500, "lr_gamma": 0.1,
                  "stride_xy": 18, "stride_z": 4},
        models={"unet_3D_dt": "vnet_dt"},
        source="UA-MT / DTC / UG-MCL on LA: V-Net, 112x112x80, 6000 iterations, lr 0.01 x0.1 every 2500, "
               "batch 4 (2 labelled), sliding window stride 18 (x, y) / 4 (z)",
        spacing=(0.625, 0.625, 0.625),
        prepare=("put the UA-MT LA tree there ({root}/2018LA_Seg_Training Set/<ID>/mri_norm2.h5 with train.list and "
                 "test.list; see data/README.md)"),
    ),
    "pancreas": DatasetLayout(
        "pancreas", _LIST_SPLITS, "Pancreas_h5/{name}_norm.h5",
        defaults={"root_path": "../data/Pancreas", "exp": "Pancreas_UGMCL", "labeled_num": 12,
                  "patch_size": (96, 96, 96), "max_iterations": 15000, "lr_schedule": "constant",
                  "stride_xy": 16, "stride_z": 16},
        models={"unet_3D_dt": "vnet_dt"},
        source="MC-Net on Pancreas-CT (62 training / 20 test cases): V-Net, 96^3, sliding window stride 16; "
               "12 labelled = 20 %",
        prepare="prepare it with `python prepare_pancreas.py --image_dir IMAGES --label_dir LABELS --out_dir {root}`",
    ),
    "coranet": DatasetLayout(
        "coranet", _CORANET_SPLITS, "{name}",
        defaults={"root_path": "../data/Pancreas_CoraNet", "exp": "Pancreas_CoraNet_UGMCL", "labeled_num": 12,
                  "patch_size": (96, 96, 96), "max_iterations": 15000, "lr_schedule": "constant",
                  "stride_xy": 16, "stride_z": 16},
        models={"unet_3D_dt": "vnet_dt"},
        source="the pancreas settings (MC-Net: V-Net, 96^3, stride 16, 12 labelled); files and lists as CoraNet "
               "writes them (preprocess/pancreas_preprocess.py, dataset/pancreas.py): a list line such as 0001.h5 is "
               "the case file under the root; --labeled_num should be the length of train_lab.txt",
        prepare="put CoraNet's h5 files there and its lists (train_lab.txt, train_unlab.txt, test.txt) in --split_dir",
    ),
}
"""``--dataset`` name -> :class:`DatasetLayout`."""

for _alias in ("nnunet", "msd"):  # what prepare_dataset.py writes from those raw layouts is the ``folder`` layout
    DATASETS[_alias] = dataclasses.replace(DATASETS["folder"], name=_alias)


def dataset_layout(name: str) -> DatasetLayout:
    """The layout registered as ``name``.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    layout = DATASETS.get(name)
    if layout is None:
        raise ValueError(f"unknown --dataset {name!r}; choose one of {sorted(DATASETS)}")
    return layout
