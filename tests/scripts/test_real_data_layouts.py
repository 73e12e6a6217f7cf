"""Slow checks on the real samples beside the repository (skipped when ``../shared/data`` is absent): the Left
Atrium tree as published trains and tests, and the ten four-modality BraTS cases train multi-class."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import preprocess_brats2019
import test_3D_dt
import train_UGMCL_3D

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TINY = ["--feature_scale", "16", "--mc_passes", "2", "--max_iterations", "2", "--val_interval", "2",
        "--num_workers", "0", "--device", "cpu", "--no_progress"]


def test_the_real_la_tree_trains_and_tests(real_la_dir: Path, tmp_path: Path) -> None:
    names = (real_la_dir / "train.list").read_text().split()
    splits = tmp_path / "split"
    splits.mkdir()
    for name, members in (("train", names[:6]), ("val", names[6:7]), ("test", names[7:9])):
        (splits / f"{name}.list").write_text("\n".join(members) + "\n")
    models = tmp_path / "model"
    common = ["--dataset", "la", "--root_path", str(real_la_dir), "--split_dir", str(splits)]
    assert train_UGMCL_3D.main([*common, "--labeled_num", "2", "--patch_size", "64", "64", "48", "--model_dir",
                                str(models), *TINY]) == 0
    run = models / "LA_UGMCL_2" / "vnet_dt"
    assert json.loads((run / "config.json").read_text())["lr_schedule"] == "step"
    out = tmp_path / "test"
    assert test_3D_dt.main([*common, "--exp", "LA_UGMCL_2", "--model", "vnet_dt", "--model_dir", str(models),
                            "--patch_size", "64", "64", "48", "--stride_xy", "48", "--stride_z", "32", "--out_dir",
                            str(out), "--device", "cpu", "--no_progress", "--no_save"]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 2 and all(r["hd95_vox"] for r in rows)


def test_the_four_modality_brats_samples_train_multi_class(real_data_dir: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for case in sorted(real_data_dir.iterdir()):
        if len(list(case.glob("*.nii*"))) == 5:  # the ten cases with all four modalities
            (raw / case.name).symlink_to(case)
    assert len(list(raw.iterdir())) == 10
    root = tmp_path / "h5"
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(root), "--modalities", "flair", "t1",
                                      "t1ce", "t2", "--label_mode", "multiclass", "--spacing", "3"]) == 0
    models = tmp_path / "model"
    assert train_UGMCL_3D.main(["--root_path", str(root), "--exp", "B4", "--labeled_num", "2", "--num_classes", "4",
                                "--patch_size", "32", "32", "32", "--model_dir", str(models), *TINY]) == 0
    config = json.loads((models / "B4_2" / "unet_3D_dt" / "config.json").read_text())
    assert (config["in_channels"], config["num_classes"]) == (4, 4)
    out = tmp_path / "test"
    assert test_3D_dt.main(["--root_path", str(root), "--exp", "B4_2", "--model_dir", str(models), "--num_classes",
                            "4", "--feature_scale", "16", "--patch_size", "32", "32", "32", "--out_dir", str(out),
                            "--device", "cpu", "--no_progress", "--no_save"]) == 0
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"dice_c1", "dice_c3", "dice_wt", "dice_tc", "dice_et", "hd95_et"} <= set(header)
