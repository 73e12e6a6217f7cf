"""Every dataset layout end to end: synthetic data written in it, (prepared,) trained a few iterations and tested.

The LA and Pancreas trees are the layouts UA-MT / DTC / MC-Net publish; ``folder`` is what ``prepare_dataset.py``
writes from an nnU-Net v2 or MSD raw folder (with an unlabelled case that has no label on disk).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import pytest

import prepare_dataset
import test_3D_dt
import train_UGMCL_3D
from dataloaders.datasets import dataset_layout
from methods import METHODS
from synthetic_h5 import write_synthetic_h5_dataset
from synthetic_raw import write_msd_raw, write_nnunet_raw

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--patch_size", "32", "32", "32", "--feature_scale", "16", "--mc_passes", "2", "--batch_size", "2",
        "--labeled_bs", "1", "--num_workers", "0", "--device", "cpu", "--no_progress"]


def _relayout(flat: Path, root: Path, layout_name: str) -> None:
    """Move a ``brats2019``-layout folder (``data/<case>.h5``, ``<split>.txt``) into another layout."""
    layout = dataset_layout(layout_name)
    for split in ("train", "val", "test"):
        names = (flat / f"{split}.txt").read_text().split()
        layout.split_path(root, split).parent.mkdir(parents=True, exist_ok=True)
        layout.split_path(root, split).write_text("".join(f"{n}\n" for n in names))
        for name in names:
            target = layout.case_path(root, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(flat / "data" / f"{name}.h5", target)


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("layouts")
    write_synthetic_h5_dataset(base / "flat", n_cases=6, shape=(36, 36, 34), seed=7, n_val=1, n_test=1)
    out = {"brats2019": base / "flat"}
    for name in ("la", "pancreas"):
        _relayout(base / "flat", base / name, name)
        out[name] = base / name
    write_nnunet_raw(base / "nnunet_raw", labelled=("a", "b", "c", "d", "e"), unlabelled=("u",))
    assert prepare_dataset.main(["--raw_dir", str(base / "nnunet_raw"), "--out_dir", str(base / "nnunet")]) == 0
    out["nnunet"] = base / "nnunet"
    write_msd_raw(base / "msd_raw", labelled=("p0", "p1", "p2", "p3", "p4"))
    assert prepare_dataset.main(["--raw_dir", str(base / "msd_raw"), "--out_dir", str(base / "msd")]) == 0
    out["msd"] = base / "msd"
    return out


def _train_and_test(root: Path, dataset: str, method: str, tmp_path: Path, *extra: str) -> dict:
    models = tmp_path / "model"
    code = train_UGMCL_3D.main(["--dataset", dataset, "--root_path", str(root), "--exp", "E", "--labeled_num", "1",
                                "--max_iterations", "2", "--val_interval", "2", "--model_dir", str(models), *TINY,
                                *extra], method=method)
    assert code == 0
    run = next((models / "E_1").iterdir())
    config = json.loads((run / "config.json").read_text())
    out = tmp_path / "test"
    code = test_3D_dt.main(["--dataset", dataset, "--root_path", str(root), "--checkpoint",
                            str(run / f"{run.name}_best_model.pth"), "--model", run.name, "--out_dir", str(out),
                            "--feature_scale", "16", "--num_classes", str(config["num_classes"]), "--patch_size",
                            "32", "32", "32", "--stride_xy", "16", "--stride_z", "16", "--device", "cpu",
                            "--no_progress", "--no_save"])
    assert code == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert rows and all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    return {"config": config, "rows": rows, "run": run}


@pytest.mark.parametrize("dataset", ["brats2019", "la", "pancreas"])
def test_each_h5_layout_trains_and_tests(trees: dict[str, Path], tmp_path: Path, dataset: str) -> None:
    result = _train_and_test(trees[dataset], dataset, "ugmcl", tmp_path)
    assert result["config"]["dataset"] == dataset
    if dataset == "la":  # the LA papers' V-Net and step schedule, chosen without --model / --lr_schedule
        assert result["run"].name == "vnet_dt" and result["config"]["lr_schedule"] == "step"
        assert "hd95_vox" in result["rows"][0]  # the LA tables report voxels


@pytest.mark.parametrize("raw", ["nnunet", "msd"])
def test_prepared_raw_folders_train_multi_modal_multi_class_with_an_unlabelled_case(
    trees: dict[str, Path], tmp_path: Path, raw: str
) -> None:
    root = trees[raw]
    description = json.loads((root / "dataset.json").read_text())
    result = _train_and_test(root, "folder", "supervised", tmp_path)
    assert result["config"]["in_channels"] == description["in_channels"] == 2
    assert result["config"]["num_classes"] == description["num_classes"] == 3
    assert {"dice_c1", "dice_c2", "hd95_c2"} <= set(result["rows"][0])  # per-class columns
    if raw == "nnunet":  # the unlabelled case has no label on disk and trains as an unlabelled row
        (name,) = (root / "unlabeled.txt").read_text().split()
        with h5py.File(root / "data" / f"{name}.h5", "r") as f:
            assert "label" not in f
        _train_and_test(root, "folder", "mean_teacher", tmp_path / "mt")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_on_the_la_tree(trees: dict[str, Path], tmp_path: Path, method: str) -> None:
    model = {"urpc": ["--model", "unet_3D_ds"]}.get(method, [])
    result = _train_and_test(trees["la"], "la", method, tmp_path, *model)
    assert result["config"]["method"] == method


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["brats2019", "pancreas", "nnunet", "msd"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_every_other_layout(trees: dict[str, Path], tmp_path: Path, dataset: str, method: str) -> None:
    layout = "folder" if dataset in ("nnunet", "msd") else dataset
    model = {"urpc": ["--model", "unet_3D_ds"]}.get(method, [])
    result = _train_and_test(trees[dataset], layout, method, tmp_path, *model)
    assert result["config"]["method"] == method
