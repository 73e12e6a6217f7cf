"""Tests of code/dataloaders/datasets.py: where each ``--dataset`` layout keeps its split lists and case files."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import train_UGMCL_3D
from dataloaders.datasets import DATASETS, dataset_layout

ROOT = Path("/data/root")

# layout -> split -> list file, and the case file of the case "c1", all written out by hand
EXPECTED_SPLITS = {
    "brats2019": {"train": "train.txt", "val": "val.txt", "test": "test.txt", "unlabeled": "unlabeled.txt"},
    "folder": {"train": "train.txt", "val": "val.txt", "test": "test.txt", "unlabeled": "unlabeled.txt"},
    "nnunet": {"train": "train.txt", "val": "val.txt", "test": "test.txt", "unlabeled": "unlabeled.txt"},
    "msd": {"train": "train.txt", "val": "val.txt", "test": "test.txt", "unlabeled": "unlabeled.txt"},
    "la": {"train": "train.list", "val": "val.list", "test": "test.list", "unlabeled": "unlabeled.list"},
    "pancreas": {"train": "train.list", "val": "val.list", "test": "test.list", "unlabeled": "unlabeled.list"},
    "coranet": {"train": "train_lab.txt", "val": "val.txt", "test": "test.txt", "unlabeled": "train_unlab.txt"},
}
EXPECTED_CASES = {
    "brats2019": ("c1", "/data/root/data/c1.h5"),
    "folder": ("c1", "/data/root/data/c1.h5"),
    "nnunet": ("c1", "/data/root/data/c1.h5"),
    "msd": ("c1", "/data/root/data/c1.h5"),
    "la": ("c1", "/data/root/2018LA_Seg_Training Set/c1/mri_norm2.h5"),
    "pancreas": ("c1", "/data/root/Pancreas_h5/c1_norm.h5"),
    "coranet": ("0001.h5", "/data/root/0001.h5"),  # a CoraNet list line is the file name
}


def test_every_registered_layout_is_tested():
    assert set(DATASETS) == set(EXPECTED_SPLITS) == set(EXPECTED_CASES)


@pytest.mark.parametrize("name", sorted(EXPECTED_SPLITS))
@pytest.mark.parametrize("split", ["train", "val", "test", "unlabeled"])
def test_split_path_of_every_layout(name, split):
    layout = dataset_layout(name)
    expected = EXPECTED_SPLITS[name][split]
    assert layout.split_path(ROOT, split) == ROOT / expected
    assert layout.split_path(str(ROOT), split, split_dir="/lists") == Path("/lists") / expected


@pytest.mark.parametrize("name", sorted(EXPECTED_CASES))
def test_case_path_of_every_layout(name):
    case, expected = EXPECTED_CASES[name]
    assert dataset_layout(name).case_path(ROOT, case) == Path(expected)
    assert dataset_layout(name).case_path(str(ROOT), case) == Path(expected)


def test_a_split_the_layout_does_not_name_is_a_txt_file():
    assert dataset_layout("la").split_path(ROOT, "extra") == ROOT / "extra.txt"


def test_unknown_layout_is_a_value_error_listing_the_names():
    with pytest.raises(ValueError, match="nope") as info:
        dataset_layout("nope")
    for name in ("brats2019", "coranet", "folder", "la", "pancreas"):
        assert name in str(info.value)


def test_coranet_defaults_are_the_pancreas_ones():
    coranet, pancreas = dataset_layout("coranet"), dataset_layout("pancreas")
    shared = ("labeled_num", "patch_size", "max_iterations", "lr_schedule", "stride_xy", "stride_z")
    assert {k: coranet.defaults[k] for k in shared} == {k: pancreas.defaults[k] for k in shared}
    assert coranet.models == pancreas.models
    assert "train_lab.txt" in coranet.source


def _write_case(path: Path, rng: np.random.Generator, with_label: bool) -> None:
    shape = (36, 36, 34)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    organ = ((x - 18) / 8) ** 2 + ((y - 17) / 7) ** 2 + ((z - 16) / 6) ** 2 <= 1
    image = (0.3 + 0.5 * organ + rng.normal(0, 0.05, shape)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("image", data=image)
        if with_label:
            f.create_dataset("label", data=organ.astype(np.uint8))


@pytest.mark.usefixtures("one_torch_thread")
def test_a_coranet_tree_trains(tmp_path):
    root, models = tmp_path / "pancreas", tmp_path / "model"
    root.mkdir()
    rng = np.random.default_rng(3)
    lists = {"train_lab.txt": ["0001.h5", "0002.h5"], "train_unlab.txt": ["0003.h5", "0004.h5"],
             "test.txt": ["0005.h5"]}
    for list_name, files in lists.items():
        (root / list_name).write_text("".join(f"{name}\n" for name in files))
        for name in files:
            _write_case(root / name, rng, with_label=name != "0004.h5")  # an unlabelled case may lack a label
    code = train_UGMCL_3D.main(["--dataset", "coranet", "--root_path", str(root), "--labeled_num", "2",
                                "--patch_size", "32", "32", "32", "--feature_scale", "16", "--mc_passes", "2",
                                "--max_iterations", "2", "--num_workers", "0", "--device", "cpu", "--no_progress",
                                "--model_dir", str(models)])
    assert code == 0  # read train_unlab.txt: 2 labelled of a 2-case train list alone leave no unlabelled case
    [run] = (models / "Pancreas_CoraNet_UGMCL_2").iterdir()
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "coranet" and config["labeled_num"] == 2
    assert run.name == "vnet_dt"  # the pancreas papers' V-Net, chosen without --model
