"""Tests of code/prepare_pancreas.py (MC-Net's Pancreas-CT preprocessing) on small synthetic CT volumes."""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

import prepare_pancreas
from dataloaders.preprocess import nonzero_bbox, resample_to_shape
from prepare_pancreas import MCNET_TEST, MCNET_TRAIN, crop_box, pad_to_min_size, split_mcnet, split_train_test

# 0.8 x 0.8 x 2 mm voxels: 1 mm resampling gives (160, 152, 100)
SHAPE = (200, 190, 50)
AFFINE = np.diag([0.8, 0.8, 2.0, 1.0])
BOX = (slice(90, 110), slice(85, 105), slice(20, 30))  # no clamping on x and y


def write_ct(folder: Path, number: int, shape=SHAPE, box=BOX, label_shape=None) -> tuple[Path, Path]:
    """CT-like volume (HU from -1000 to 1000) with a labelled box, as PANCREAS_<n>.nii.gz and label<n>.nii.gz."""
    rng = np.random.default_rng(number)
    image = rng.uniform(-1000, 1000, size=shape).astype(np.int16)
    label = np.zeros(label_shape or shape, dtype=np.uint8)
    label[box] = 1
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    image_path = folder / "images" / f"PANCREAS_{number:04d}.nii.gz"
    label_path = folder / "labels" / f"label{number:04d}.nii.gz"
    nib.save(nib.Nifti1Image(image, AFFINE), image_path)
    nib.save(nib.Nifti1Image(label, AFFINE), label_path)
    return image_path, label_path


def run(root: Path, out: Path, *extra: str) -> int:
    argv = ["--image_dir", str(root / "images"), "--label_dir", str(root / "labels"), "--out_dir", str(out)]
    return prepare_pancreas.main([*argv, "--interpolation", "linear", *extra])


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------------------------ pure steps


def test_mcnet_split_is_the_published_one_in_its_order():
    names = [f"image{i:04d}" for i in range(1, 83)]
    train, test = split_mcnet(names[::-1])
    assert train == list(MCNET_TRAIN) and test == list(MCNET_TEST)
    assert len(train) == 62 and len(test) == 20 and not set(train) & set(test)
    assert train[:3] == ["image0057", "image0018", "image0062"] and test[:3] == ["image0050", "image0059", "image0037"]
    train, test = split_mcnet(["image0003", "image0001", "image0099", "image0057"])
    assert train == ["image0057", "image0003", "image0099"] and test == ["image0001"]  # unknown cases go last


def test_sorted_split_is_the_last_round_n_20_82_case_numbers():
    names = [f"image{i:04d}" for i in range(1, 83)]
    train, test = split_train_test(names[::-1])
    assert train == names[:62] and test == names[62:]
    assert split_train_test(names[:10]) == (names[:8], names[8:10])  # round(10 * 20 / 82) = 2
    assert split_train_test(names[:2]) == (names[:1], names[1:2])
    assert split_train_test(names[:1]) == (names[:1], [])


def test_crop_box_is_mcnets_label_box_plus_margin_widened_to_the_minimum_and_clamped():
    label = np.zeros((300, 300, 300), dtype=np.uint8)
    label[100:210, 80:90, 5:15] = 1  # first / last voxel: 100 / 209, 80 / 89, 5 / 14
    box = crop_box(label, axes=(0, 1), margin=25, min_size=96)
    assert box[0] == (100 - 25, 209 + 25)  # wide enough already: 25 before the first voxel, 24 after the last
    assert box[1] == (80 - 43 - 25, 89 + 43 + 25)  # widened by (96 - 9) // 2 = 43 on each side first
    assert box[2] == (0, 300)  # z is not cropped (MC-Net)
    assert crop_box(label, axes=(0, 1, 2))[2] == (0, 14 + 43 + 25)  # clamped at 0


def test_padding_is_centred_with_the_given_value():
    padded, widths = pad_to_min_size(np.ones((94, 96, 100)), 96, value=-3.0)
    assert padded.shape == (96, 96, 100) and widths == [(1, 1), (0, 0), (0, 0)]
    assert padded[0].max() == -3.0 and padded[-1].max() == -3.0 and padded[1:-1].min() == 1.0


# ---------------------------------------------------------------------------------------------------- the CLI


def test_case_is_resampled_windowed_cropped_and_zscored(tmp_path):
    write_ct(tmp_path, 1)
    out = tmp_path / "out"
    assert run(tmp_path, out) == 0
    with h5py.File(out / "Pancreas_h5" / "image0001_norm.h5") as f:
        image, label, attrs = f["image"][()], f["label"][()], dict(f.attrs)
        assert f["image"].compression == "gzip"
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert list(attrs["resampled_shape"]) == [160, 152, 100]
    # the box of the resampled label, widened towards 96 and +-25 on x and y (as crop_roi); every z slice kept
    label_full = np.zeros(SHAPE, np.uint8)
    label_full[BOX] = 1
    (x0, x1), (y0, y1), _ = nonzero_bbox(resample_to_shape(label_full, (160, 152, 100), order=0))
    gx, gy = (96 - (x1 - 1 - x0)) // 2, (96 - (y1 - 1 - y0)) // 2
    expected = [(x0 - gx - 25, x1 - 1 + gx + 25), (y0 - gy - 25, y1 - 1 + gy + 25), (0, 100)]
    assert list(zip(attrs["crop_start"], attrs["crop_stop_exclusive"])) == expected
    assert image.shape == tuple(b - a for a, b in expected) and all(n >= 96 for n in image.shape)
    assert list(attrs["pad_before"]) == [0, 0, 0]
    # z-scored over the cropped volume; inverting it gives HU inside the window, both ends reached
    assert abs(float(image.mean())) < 1e-4 and float(image.std()) == pytest.approx(1.0, abs=1e-4)
    hu = image * attrs["zscore_std"] + attrs["zscore_mean"]
    assert hu.min() == pytest.approx(-125, abs=1e-2) and hu.max() == pytest.approx(275, abs=1e-2)
    assert set(np.unique(label)) == {0, 1} and label.sum() > 0
    np.testing.assert_allclose(attrs["spacing"], [1.0, 1.0, 1.0], rtol=1e-6)  # 200 * 0.8 / 160, 190 * 0.8 / 152 ...
    factor = np.asarray(SHAPE) / [160, 152, 100]
    first_voxel = factor * np.asarray([start for start, _ in expected]) + (factor - 1) / 2  # in the file's voxels
    np.testing.assert_allclose(attrs["affine"] @ [0, 0, 0, 1], AFFINE @ [*first_voxel, 1], rtol=1e-6)


def test_small_volume_is_padded_to_96_with_the_window_minimum(tmp_path):
    write_ct(tmp_path, 2, shape=(50, 40, 30), box=(slice(20, 30), slice(15, 25), slice(10, 20)))
    out = tmp_path / "out"
    assert run(tmp_path, out, "--crop_axes", "xyz") == 0
    with h5py.File(out / "Pancreas_h5" / "image0002_norm.h5") as f:
        image, label, attrs = f["image"][()], f["label"][()], dict(f.attrs)
    assert image.shape == (96, 96, 96)
    assert list(attrs["resampled_shape"]) == [40, 32, 60]  # every axis clamped to the whole volume
    before = attrs["pad_before"]
    assert list(before) == [28, 32, 18] and list(attrs["pad_after"]) == [28, 32, 18]
    pad = (-125 - attrs["zscore_mean"]) / attrs["zscore_std"]
    assert attrs["pad_value"] == pytest.approx(pad)
    assert np.all(image[:28] == np.float32(pad)) and np.all(label[:28] == 0)
    inner = image[28:68, 32:64, 18:78]
    assert abs(float(inner.mean())) < 1e-4 and float(inner.std()) == pytest.approx(1.0, abs=1e-4)


def test_lists_are_mcnets_split_of_the_cases_found_or_sorted_by_number(tmp_path):
    small = {"shape": (40, 40, 20), "box": (slice(15, 25), slice(15, 25), slice(8, 12))}
    for number in (7, 3, 12, 5, 1):
        write_ct(tmp_path, number, **small)
    out = tmp_path / "out"
    assert run(tmp_path, out) == 0
    names = ["image0001", "image0003", "image0005", "image0007", "image0012"]
    assert sorted(p.name for p in (out / "Pancreas_h5").iterdir()) == [f"{n}_norm.h5" for n in names]
    assert (out / "train.list").read_text().splitlines() == ["image0007", "image0012", "image0003"]  # MC-Net order
    assert (out / "test.list").read_text().splitlines() == ["image0005", "image0001"]
    assert run(tmp_path, out, "--split", "sorted") == 0
    assert (out / "train.list").read_text().splitlines() == names[:4]  # round(5 * 20 / 82) = 1 test case
    assert (out / "test.list").read_text().splitlines() == names[4:]


def test_label_with_another_affine_gets_a_note(tmp_path, capsys):
    _, label_path = write_ct(tmp_path, 1, shape=(40, 40, 20), box=(slice(15, 25), slice(15, 25), slice(8, 12)))
    label = nib.load(label_path)
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), np.diag([-0.8, 0.8, 2.0, 1.0])), label_path)
    assert run(tmp_path, tmp_path / "out") == 0
    assert f"note: image0001: {label_path} and " in capsys.readouterr().err


def test_bspline_interpolation_stays_inside_the_window(tmp_path):
    write_ct(tmp_path, 4, shape=(40, 40, 20), box=(slice(15, 25), slice(15, 25), slice(8, 12)))
    out = tmp_path / "out"
    argv = ["--image_dir", str(tmp_path / "images"), "--label_dir", str(tmp_path / "labels"), "--out_dir", str(out)]
    assert prepare_pancreas.main(argv) == 0  # default: bspline
    with h5py.File(out / "Pancreas_h5" / "image0004_norm.h5") as f:
        hu = f["image"][()] * f.attrs["zscore_std"] + f.attrs["zscore_mean"]
        assert f.attrs["interpolation"] == "bspline"
    assert hu.min() >= -125 - 1e-2 and hu.max() <= 275 + 1e-2


def _missing_label(root: Path) -> tuple[str, str]:
    (root / "labels" / "label0002.nii.gz").unlink()
    return "image0002", f"{root / 'images' / 'PANCREAS_0002.nii.gz'} has no label; expected label0002.nii.gz"


def _shape_mismatch(root: Path) -> tuple[str, str]:
    write_ct(root, 2, shape=(40, 40, 20), box=(slice(15, 25), slice(15, 25), slice(8, 12)), label_shape=(40, 40, 19))
    return "image0002", f"{root / 'labels' / 'label0002.nii.gz'} has shape (40, 40, 19) but"


def _empty_label(root: Path) -> tuple[str, str]:
    write_ct(root, 2, shape=(40, 40, 20), box=(slice(0, 0),) * 3)
    return "image0002", f"{root / 'labels' / 'label0002.nii.gz'} is empty (no labelled voxel)"


@pytest.mark.parametrize("breaker", [_missing_label, _shape_mismatch, _empty_label])
def test_a_bad_case_is_one_line_exit_1_no_h5_and_no_lists(tmp_path, capsys, breaker):
    for number in (1, 2, 3):
        write_ct(tmp_path, number, shape=(40, 40, 20), box=(slice(15, 25), slice(15, 25), slice(8, 12)))
    name, message = breaker(tmp_path)
    out = tmp_path / "out"
    assert run(tmp_path, out) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}: ") and message in lines[0]
    assert sorted(p.name for p in (out / "Pancreas_h5").iterdir()) == ["image0001_norm.h5", "image0003_norm.h5"]
    assert not (out / "train.list").exists() and not (out / "test.list").exists()


@pytest.mark.parametrize(
    "args, message",
    [(["--workers", "0"], "--workers must be >= 1"), (["--window", "275", "-125"], "LOW must be below HIGH"),
     (["--crop_axes", "z"], "invalid choice")],
)
def test_bad_arguments_exit_with_2(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        run(tmp_path, tmp_path / "out", *args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_images_and_labels_may_share_one_folder(tmp_path):
    image_path, label_path = write_ct(tmp_path, 1, shape=(40, 40, 20), box=(slice(15, 25), slice(15, 25), slice(8, 12)))
    label_path.rename(image_path.parent / label_path.name)
    folder, out = str(image_path.parent), tmp_path / "out"
    assert prepare_pancreas.main(["--image_dir", folder, "--label_dir", folder, "--out_dir", str(out)]) == 0
    assert [p.name for p in (out / "Pancreas_h5").iterdir()] == ["image0001_norm.h5"]


def test_unpaired_files_are_one_line_each_and_no_lists(tmp_path, capsys):
    write_ct(tmp_path, 1, shape=(40, 40, 20), box=(slice(15, 25), slice(15, 25), slice(8, 12)))
    (tmp_path / "images" / "scan.nii.gz").write_bytes(b"")
    (tmp_path / "labels" / "label0009.nii.gz").write_bytes(b"")
    out = tmp_path / "out"
    assert run(tmp_path, out) == 1
    lines = error_lines(capsys.readouterr().err)
    assert lines == [
        f"error: {tmp_path / 'images' / 'scan.nii.gz'} has no 4-digit case number; expected a name like "
        "PANCREAS_0001.nii.gz",
        f"error: image0009: {tmp_path / 'labels' / 'label0009.nii.gz'} has no image in {tmp_path / 'images'}",
    ]
    assert (out / "Pancreas_h5" / "image0001_norm.h5").is_file() and not (out / "train.list").exists()
