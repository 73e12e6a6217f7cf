"""Tests of code/test_3D_dt.py and engine/evaluate.py on a tiny synthetic test split (CPU, patch 32^3)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from dataloaders.preprocess import find_cases, preprocess_case, write_case_h5
from engine.evaluate import CSV_COLUMNS, keep_largest_component, stored_geometry
from networks.net_factory_3d import net_factory_3d
from synthetic_h5 import write_synthetic_h5_dataset
from test_3D_dt import main
from utils.metrics import dice, hd95

RAW_SHAPE = (46, 44, 30)
RAW_SPACING = (1.0, 1.0, 1.5)
RAW_AFFINE = np.array([[-1.0, 0.0, 0.0, 20.0], [0.0, -1.0, 0.0, 230.0], [0.0, 0.0, 1.5, -7.0], [0.0, 0.0, 0.0, 1.0]])
GEOMETRY_CASE = "BraTS19_GEO_0001_1"
FAST = ["--patch_size", "32", "32", "32", "--stride_xy", "16", "--stride_z", "16", "--feature_scale", "8"]
FAST += ["--device", "cpu", "--no_progress"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_raw_case(raw: Path, name: str) -> None:
    """A small BraTS-like NIfTI case (LPS affine, 1.5 mm slices) with the brain off-centre, so the crop moves it."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in RAW_SHAPE), indexing="ij")
    brain = ((x - 25) / 16) ** 2 + ((y - 20) / 15) ** 2 + ((z - 14) / 11) ** 2 <= 1
    tumour = (x - 27) ** 2 + (y - 21) ** 2 + ((z - 15) * 1.5) ** 2 <= 25
    rng = np.random.default_rng(3)
    flair = np.where(brain, rng.integers(200, 400, size=RAW_SHAPE) + 300 * tumour, 0).astype(np.int16)
    seg = np.where(tumour & brain, 2, 0).astype(np.int16)
    folder = raw / name
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(flair, RAW_AFFINE), folder / f"{name}_flair.nii.gz")
    nib.save(nib.Nifti1Image(seg, RAW_AFFINE), folder / f"{name}_seg.nii.gz")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Test split: a normal synthetic case, one with an empty label, and one preprocessed with geometry attributes."""
    root = tmp_path_factory.mktemp("brats")
    names = write_synthetic_h5_dataset(root, n_cases=3, shape=(40, 40, 32), seed=7, n_val=0, n_test=2, empty=(2,))
    raw = tmp_path_factory.mktemp("raw")
    write_raw_case(raw, GEOMETRY_CASE)
    image, label, attrs = preprocess_case(find_cases(raw)[0])
    write_case_h5(root / "data" / f"{GEOMETRY_CASE}.h5", image, label, attrs)
    (root / "test.txt").write_text(f"{names[1]}\r\n{names[2]}\r\n{GEOMETRY_CASE}\r\n", encoding="utf-8")
    return root


def tiny_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return net_factory_3d("unet_3D_dt", in_chns=1, class_num=2, feature_scale=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """``<model_dir>/EXP/unet_3D_dt/unet_3D_dt_best_model.pth``: a random network saved as a plain state_dict."""
    root = tmp_path_factory.mktemp("model")
    path = root / "EXP" / "unet_3D_dt" / "unet_3D_dt_best_model.pth"
    path.parent.mkdir(parents=True)
    torch.save(tiny_net().state_dict(), path)
    return root


@pytest.fixture(scope="module")
def run(dataset, model_dir) -> Path:
    """One full run with default output folder, --native and MC uncertainty; returns the output folder."""
    out = model_dir / "EXP" / "unet_3D_dt_predictions"
    out.mkdir()
    (out / "my_notes.txt").write_text("keep me", encoding="utf-8")
    (out / "old_run").mkdir()
    code = main(
        ["--root_path", str(dataset), "--model_dir", str(model_dir), "--exp", "EXP", "--native"]
        + ["--mc_passes", "2", *FAST]
    )
    assert code == 0
    return out


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def case_names(dataset: Path) -> list[str]:
    return [line.strip() for line in (dataset / "test.txt").read_text().splitlines() if line.strip()]


def test_run_writes_metrics_summary_and_niftis_beside_unrelated_files(run, dataset):
    assert (run / "my_notes.txt").read_text() == "keep me"
    assert (run / "old_run").is_dir()
    rows = read_rows(run / "metrics.csv")
    assert list(rows[0].keys()) == list(CSV_COLUMNS)
    assert [r["case"] for r in rows] == case_names(dataset)
    for name in case_names(dataset):
        for kind in ("pred", "img", "gt", "unc"):
            assert (run / f"{name}_{kind}.nii.gz").is_file()
    assert not [p for p in run.iterdir() if ".part" in p.name]  # no temporary file left behind


def test_niftis_have_the_h5_shape_and_spacing(run, dataset):
    for name in case_names(dataset):
        with h5py.File(dataset / "data" / f"{name}.h5", "r") as f:
            shape = f["image"].shape
        expected_spacing = RAW_SPACING if name == GEOMETRY_CASE else (1.0, 1.0, 1.0)
        for kind, dtype in (("pred", np.uint8), ("img", np.float32), ("gt", np.uint8), ("unc", np.float32)):
            img = nib.load(run / f"{name}_{kind}.nii.gz")
            assert img.shape == shape
            assert img.get_data_dtype() == dtype
            np.testing.assert_allclose(img.header.get_zooms()[:3], expected_spacing)
        unc = np.asarray(nib.load(run / f"{name}_unc.nii.gz").dataobj)
        assert unc.min() >= 0 and unc.max() <= math.log(2) + 1e-6


def test_csv_dice_and_hd95_match_the_written_prediction_and_label(run, dataset):
    for row in read_rows(run / "metrics.csv"):
        pred_img = nib.load(run / f"{row['case']}_pred.nii.gz")
        pred = np.asarray(pred_img.dataobj) > 0
        gt = np.asarray(nib.load(run / f"{row['case']}_gt.nii.gz").dataobj) > 0
        assert float(row["dice"]) == pytest.approx(dice(pred, gt), abs=1e-12)
        expected_hd = hd95(pred, gt, spacing=pred_img.header.get_zooms()[:3])
        assert (math.isnan(expected_hd) and row["hd95"] == "nan") or float(row["hd95"]) == pytest.approx(expected_hd)
        assert row["empty_gt"] == str(int(not gt.any()))
        assert row["empty_pred"] == str(int(not pred.any()))


def test_empty_label_is_counted_not_fatal(run, dataset):
    rows = {r["case"]: r for r in read_rows(run / "metrics.csv")}
    empty_case = case_names(dataset)[1]
    assert rows[empty_case]["empty_gt"] == "1"
    assert rows[empty_case]["hd95"] == "nan"
    summary = json.loads((run / "summary.json").read_text(), parse_constant=pytest.fail)  # strict JSON, no NaN
    assert summary["n_cases"] == 3
    assert summary["n_empty_gt"] == 1
    assert summary["metrics"]["hd95"]["n_nan"] >= 1
    finite = [float(r["dice"]) for r in rows.values()]
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(np.mean(finite))
    assert summary["metrics"]["dice"]["std"] == pytest.approx(np.std(finite))
    assert summary["config"]["patch_size"] == [32, 32, 32]
    assert summary["config"]["mc_passes"] == 2
    assert len(summary["config"]["checkpoint_git_blob_id"]) == 40


def test_cropped_prediction_carries_the_original_affine_shifted_by_the_crop(run, dataset):
    with h5py.File(dataset / "data" / f"{GEOMETRY_CASE}.h5", "r") as f:
        attrs_start = np.asarray(f.attrs["bbox_start"])
    affine = nib.load(run / f"{GEOMETRY_CASE}_pred.nii.gz").affine
    expected = RAW_AFFINE.copy()
    expected[:3, 3] = RAW_AFFINE[:3, :3] @ attrs_start + RAW_AFFINE[:3, 3]  # world position of the crop's voxel 0
    np.testing.assert_allclose(affine, expected, atol=1e-6)
    assert attrs_start.any()  # the crop really moved the origin


def test_native_prediction_has_the_original_grid_and_affine(run, dataset):
    native = nib.load(run / f"{GEOMETRY_CASE}_pred_native.nii.gz")
    assert native.shape == RAW_SHAPE
    np.testing.assert_allclose(native.affine, RAW_AFFINE, atol=1e-6)
    cropped = np.asarray(nib.load(run / f"{GEOMETRY_CASE}_pred.nii.gz").dataobj)
    with h5py.File(dataset / "data" / f"{GEOMETRY_CASE}.h5", "r") as f:
        start, stop = f.attrs["bbox_start"], f.attrs["bbox_stop_exclusive"]
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    data = np.asarray(native.dataobj)
    np.testing.assert_array_equal(data[box], cropped)
    outside = data.copy()
    outside[box] = 0
    assert not outside.any()
    # cases without geometry attributes get no native file, and are counted
    assert not (run / f"{case_names(dataset)[0]}_pred_native.nii.gz").exists()
    assert json.loads((run / "summary.json").read_text())["n_native_skipped"] == 2


def test_no_save_writes_metrics_only(dataset, model_dir, tmp_path):
    out = tmp_path / "metrics_only"
    code = main(
        ["--root_path", str(dataset), "--model_dir", str(model_dir), "--exp", "EXP", "--out_dir", str(out)]
        + ["--no_save", "--lcc", *FAST]
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "summary.json"]


def test_fast_network_gives_the_plain_scores_and_is_recorded(run, dataset, model_dir, tmp_path):
    out = tmp_path / "fast"
    code = main(
        ["--root_path", str(dataset), "--model_dir", str(model_dir), "--exp", "EXP", "--out_dir", str(out)]
        + ["--no_save", "--fast", *FAST]
    )
    assert code == 0
    plain = {r["case"]: float(r["dice"]) for r in read_rows(run / "metrics.csv")}
    fast = {r["case"]: float(r["dice"]) for r in read_rows(out / "metrics.csv")}
    assert fast.keys() == plain.keys()
    for case in plain:  # same probabilities up to float rounding: a near-tie voxel may flip, no more
        assert fast[case] == pytest.approx(plain[case], abs=1e-3), case
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["speed"]["fast_network"] is True


@pytest.mark.parametrize(("flag", "enabled"), [([], True), (["--keep_freed_memory", "0"], False)])
def test_keep_freed_memory_is_on_by_default_on_cpu(dataset, model_dir, tmp_path, monkeypatch, flag, enabled):
    import contextlib

    import speed

    calls = []

    @contextlib.contextmanager
    def recorder():
        calls.append("kept")
        yield True

    monkeypatch.setattr(speed, "keeping_freed_memory", recorder)
    out = tmp_path / "o"
    args = ["--root_path", str(dataset), "--model_dir", str(model_dir), "--exp", "EXP", "--out_dir", str(out)]
    assert main(args + ["--no_save", *FAST, *flag]) == 0
    n_cases = len((dataset / "test.txt").read_text().split())
    assert calls == (["kept"] * n_cases if enabled else [])  # around each case's prediction


def test_checkpoint_that_does_not_fit_exits_1_naming_the_keys(dataset, tmp_path, capsys):
    state = tiny_net().state_dict()
    state["extra_head.weight"] = state.pop("final.weight")
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    code = main(["--root_path", str(dataset), "--checkpoint", str(path), "--out_dir", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert "final.weight" in err and "extra_head.weight" in err and str(path) in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_missing_published_checkpoint_points_to_the_download_script(dataset, tmp_path, capsys):
    code = main(["--root_path", str(dataset), "--model_dir", str(tmp_path), "--exp", "BraTs2019_UGMCL_25", *FAST])
    err = capsys.readouterr().err
    assert code == 1
    assert "download_pretrained.py --labeled_num 25" in err


def test_corrupt_h5_exits_1_naming_the_file_before_predicting(dataset, model_dir, tmp_path, capsys):
    root = tmp_path / "broken"
    (root / "data").mkdir(parents=True)
    names = case_names(dataset)
    for name in names:
        (root / "data" / f"{name}.h5").write_bytes((dataset / "data" / f"{name}.h5").read_bytes())
    (root / "test.txt").write_text("\n".join(names) + "\n")
    bad = root / "data" / f"{names[-1]}.h5"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    out = tmp_path / "o"
    code = main(["--root_path", str(root), "--model_dir", str(model_dir), "--exp", "EXP", "--out_dir", str(out), *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert str(bad) in err and len(err.splitlines()) == 1
    assert not (out / "metrics.csv").exists()


def test_largest_component_keeps_the_biggest_blob_and_its_class_values():
    labels = np.zeros((12, 12, 12), dtype=np.uint8)
    labels[1:3, 1:3, 1:3] = 1  # 8 voxels
    labels[6:9, 6:9, 6:9] = 2  # 27 voxels, touching the next one only at a corner
    labels[5, 5, 5] = 1
    labels[7, 7, 7] = 1  # inside the big blob, other class
    kept = keep_largest_component(labels)  # 26-connectivity: corner joins
    expected = np.zeros_like(labels)
    expected[6:9, 6:9, 6:9] = labels[6:9, 6:9, 6:9]
    expected[5, 5, 5] = 1
    np.testing.assert_array_equal(kept, expected)
    faces_only = keep_largest_component(labels, connectivity=1)
    expected[5, 5, 5] = 0
    np.testing.assert_array_equal(faces_only, expected)
    empty = np.zeros((4, 4, 4), dtype=np.uint8)
    np.testing.assert_array_equal(keep_largest_component(empty), empty)
    with pytest.raises(ValueError, match="connectivity"):
        keep_largest_component(labels, connectivity=4)


def test_geometry_without_the_affine_attribute_is_the_original_shifted_by_the_crop():
    original = np.array([[0.0, 0.0, 2.0, 5.0], [-1.0, 0.0, 0.0, 3.0], [0.0, 1.0, 0.0, -2.0], [0, 0, 0, 1]])
    attrs = {"original_affine": original, "bbox_start": np.array([4, 6, 8]), "bbox_stop_exclusive": [14, 16, 18]}
    affine, spacing = stored_geometry(attrs, (10, 10, 10))
    np.testing.assert_allclose(affine[:3, :3], original[:3, :3])
    np.testing.assert_allclose(affine[:3, 3], original[:3, :3] @ [4, 6, 8] + original[:3, 3])
    assert spacing == (1.0, 1.0, 2.0)
    # stored grid resampled to half the voxels: voxel 0 is the centre of the first 2x2x2 block, voxels twice as large
    affine, spacing = stored_geometry(attrs, (5, 5, 5))
    np.testing.assert_allclose(affine[:3, :3], 2 * original[:3, :3])
    np.testing.assert_allclose(affine[:3, 3], original[:3, :3] @ [4.5, 6.5, 8.5] + original[:3, 3])
    assert spacing == (2.0, 2.0, 4.0)
    assert stored_geometry({}, (3, 3, 3))[1] == (1.0, 1.0, 1.0)
