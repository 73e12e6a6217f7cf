"""Tests of dataloaders/preprocess.py on tiny synthetic NIfTI cases (and on real BraTS cases when present)."""

from __future__ import annotations

import errno
import gzip
import math
import os
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from dataloaders.preprocess import (
    SPLIT_MANIFEST,
    CaseError,
    CaseFiles,
    PreprocessOptions,
    crop_to_nonzero,
    find_cases,
    is_valid_h5,
    make_label,
    make_splits,
    nonzero_bbox,
    normalise_intensity,
    preprocess_case,
    process_case_to_h5,
    read_case_h5,
    read_h5_attrs,
    resample_case_file,
    resample_labels,
    restore_to_original,
    split_sizes,
    write_case_h5,
)

SHAPE = (40, 36, 30)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
LPS[:3, 3] = (39.0, 35.0, 0.0)


def synthetic_volumes(shape=SHAPE, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """An ellipsoid brain with a three-part tumour: images int16 (background exactly 0), seg in {0, 1, 2, 4}."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centre = np.asarray(shape) / 2.0 - 0.5
    radii = np.asarray(shape) * np.asarray([0.35, 0.33, 0.3])
    brain = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2
    brain = brain <= 1.0
    tumour_r = np.sqrt((x - centre[0] - 3) ** 2 + (y - centre[1] + 2) ** 2 + (z - centre[2]) ** 2)
    seg = np.zeros(shape, dtype=np.int16)
    seg[tumour_r <= 5] = 2
    seg[tumour_r <= 3.5] = 4
    seg[tumour_r <= 2] = 1
    images = {}
    for i, modality in enumerate(("flair", "t1", "t1ce", "t2")):
        img = rng.integers(100 + 50 * i, 400 + 80 * i, size=shape).astype(np.int16)
        img[seg > 0] += 200
        img[~brain] = 0
        images[modality] = img
    return images, seg


def write_case(
    root: Path,
    name: str,
    modalities=("flair", "t1", "t1ce", "t2"),
    seed: int = 0,
    ext: str = ".nii.gz",
    affine: np.ndarray = LPS,
    images: dict[str, np.ndarray] | None = None,
    seg: np.ndarray | None = None,
    with_seg: bool = True,
) -> Path:
    """Write ``root/<name>/<name>_<modality>.nii.gz`` files like the BraTS release; returns the case folder."""
    default_images, default_seg = synthetic_volumes(seed=seed)
    images = default_images if images is None else images
    seg = default_seg if seg is None else seg
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for modality in modalities:
        nib.save(nib.Nifti1Image(images[modality], affine), folder / f"{name}_{modality}{ext}")
    if with_seg:
        nib.save(nib.Nifti1Image(seg, affine), folder / f"{name}_seg{ext}")
    return folder


def the_case(root: Path, name: str) -> CaseFiles:
    (case,) = [c for c in find_cases(root) if c.name == name]
    return case


def brute_force_percentile(values: np.ndarray, q: float) -> float:
    """Smallest v with at least q % of the values <= v, by sorting (integer arithmetic on the rank)."""
    ordered = np.sort(values.ravel())
    rank = -(-round(q * 10) * ordered.size // 1000)  # ceil(q / 100 * n) for q with one decimal
    return float(ordered[rank - 1])


# --------------------------------------------------------------------------------------------------- find_cases


def test_find_cases_accepts_flat_and_nested_layouts_and_any_brats_prefix(tmp_path):
    write_case(tmp_path / "MICCAI_BraTS_2019_Data_Training" / "HGG", "BraTS19_2013_2_1", modalities=("flair",))
    write_case(tmp_path / "MICCAI_BraTS_2019_Data_Training" / "LGG", "BraTS19_TCIA09_141_1", modalities=("flair",))
    write_case(tmp_path, "Brats18_CBICA_AAA_1", modalities=("flair", "t1"), ext=".nii")
    write_case(tmp_path, "BraTS2021_00000", modalities=("t2",))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("not a case")
    cases = find_cases(tmp_path)
    assert [c.name for c in cases] == sorted(
        ["BraTS19_2013_2_1", "BraTS19_TCIA09_141_1", "Brats18_CBICA_AAA_1", "BraTS2021_00000"]
    )
    by_name = {c.name: c for c in cases}
    assert set(by_name["Brats18_CBICA_AAA_1"].images) == {"flair", "t1"}
    assert by_name["Brats18_CBICA_AAA_1"].images["t1"].name == "Brats18_CBICA_AAA_1_t1.nii"
    assert by_name["BraTS19_TCIA09_141_1"].folder.parent.name == "LGG"
    assert set(by_name["BraTS2021_00000"].images) == {"t2"}  # missing FLAIR is reported later, per case
    assert all(c.seg is not None for c in cases)


def test_find_cases_rejects_a_case_name_found_twice(tmp_path):
    write_case(tmp_path / "HGG", "BraTS19_X_1", modalities=("flair",))
    write_case(tmp_path / "LGG", "BraTS19_X_1", modalities=("flair",))
    with pytest.raises(ValueError, match="BraTS19_X_1.*found twice"):
        find_cases(tmp_path)


def test_find_cases_follows_linked_case_folders_but_not_link_loops(tmp_path):
    write_case(tmp_path / "elsewhere", "BraTS19_L_1", modalities=("flair",))
    (tmp_path / "raw").mkdir()
    try:
        (tmp_path / "raw" / "BraTS19_L_1").symlink_to(tmp_path / "elsewhere" / "BraTS19_L_1")
        (tmp_path / "raw" / "loop").symlink_to(tmp_path / "raw")
    except OSError:
        pytest.skip("no symlinks on this file system")
    assert [c.name for c in find_cases(tmp_path / "raw")] == ["BraTS19_L_1"]


def test_find_cases_rejects_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_cases(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------- array steps


def test_bbox_is_inclusive_of_the_last_nonzero_voxel():
    image = np.zeros((10, 12, 8))
    image[2, 5, 3] = 1.0
    image[7, 9, 6] = -2.0  # nonzero counts, whatever its sign
    assert nonzero_bbox(image) == ((2, 8), (5, 10), (3, 7))
    cropped, bbox = crop_to_nonzero(image)
    assert cropped.shape == (6, 5, 4)
    assert cropped[-1, -1, -1] == -2.0 and cropped[0, 0, 0] == 1.0  # the original's [min:max) lost this voxel


def test_bbox_of_several_channels_covers_each_channel():
    image = np.zeros((2, 6, 6, 6))
    image[0, 1, 1, 1] = 1.0
    image[1, 4, 5, 2] = 1.0
    cropped, bbox = crop_to_nonzero(image)
    assert bbox == ((1, 5), (1, 6), (1, 3))
    assert cropped.shape == (2, 4, 5, 2)


def test_bbox_of_an_all_zero_image_raises():
    with pytest.raises(ValueError, match="no nonzero voxel"):
        nonzero_bbox(np.zeros((3, 3, 3)))


def test_clip_value_is_the_lower_percentile_of_the_whole_volume():
    rng = np.random.default_rng(1)
    image = np.zeros((11, 13, 9))  # 1287 voxels: 99.9 % of them is not a whole number
    image[2:9, 2:11, 1:8] = rng.integers(1, 60, size=(7, 9, 7))
    image[5, 5, 5] = 1000.0  # one outlier to be clipped
    v = brute_force_percentile(image, 99.9)
    # the definition, checked directly: at least 99.9 % of the voxels are <= v, fewer than that are < v
    assert np.mean(image <= v) >= 0.999 and np.mean(image < v) < 0.999
    out = normalise_intensity(image)
    clipped = np.minimum(image, v)
    mean, std = clipped[clipped > 0].mean(), clipped[clipped > 0].std()
    np.testing.assert_allclose(out, (clipped - mean) / std, rtol=1e-6, atol=1e-6)
    assert out.dtype == np.float32


def test_clip_rank_is_exact_when_the_percentile_falls_on_a_whole_voxel():
    # 99.9 % of 8000 voxels is exactly 7992: v is the 7992nd smallest value (7992), not the next one, which
    # numpy.percentile(method="inverted_cdf") returns because 99.9 / 100 * 8000 = 7992.000000000001 in floats
    image = np.arange(1, 8001, dtype=np.float64).reshape(20, 20, 20)
    clipped = np.minimum(image, 7992.0)
    expected = (clipped - clipped.mean()) / clipped.std()
    np.testing.assert_allclose(normalise_intensity(image), expected, rtol=1e-6, atol=1e-6)


def test_zscore_uses_brain_voxels_and_shifts_the_background():
    rng = np.random.default_rng(2)
    image = np.zeros((20, 20, 20))
    image[4:16, 3:17, 5:15] = rng.normal(500, 80, size=(12, 14, 10)).clip(1)
    out = normalise_intensity(image)
    brain = image > 0
    assert abs(out[brain].mean()) < 1e-3 and abs(out[brain].std() - 1) < 1e-3
    # released behaviour: background is z-scored too, to -mean / std of the clipped brain
    clipped = np.minimum(image, brute_force_percentile(image, 99.9))
    expected_background = -clipped[brain].mean() / clipped[brain].std()
    np.testing.assert_allclose(out[~brain], expected_background, rtol=1e-5)


def test_clip_over_brain_ranks_only_the_brain_voxels():
    image = np.zeros((10, 10, 10))
    image[2:8, 2:8, 2:8] = np.arange(1, 217).reshape(6, 6, 6)
    v = brute_force_percentile(image[image > 0], 99.9)
    out = normalise_intensity(image, clip_over="brain")
    clipped = np.minimum(image, v)
    brain = clipped[clipped > 0]
    np.testing.assert_allclose(out, (clipped - brain.mean()) / brain.std(), rtol=1e-6, atol=1e-6)


def test_constant_brain_cannot_be_zscored():
    image = np.zeros((6, 6, 6))
    image[1:5, 1:5, 1:5] = 7.0
    with pytest.raises(ValueError, match="std 0"):
        normalise_intensity(image)


def test_label_modes_follow_the_brats_region_definitions():
    seg = np.array([0, 1, 2, 4, 4, 2], dtype=np.int16).reshape(1, 2, 3)
    np.testing.assert_array_equal(make_label(seg, "wt").ravel(), [0, 1, 1, 1, 1, 1])
    regions = make_label(seg, "regions")
    assert regions.shape == (3, 1, 2, 3) and regions.dtype == np.uint8
    np.testing.assert_array_equal(regions[0].ravel(), [0, 1, 1, 1, 1, 1])  # WT {1, 2, 4}
    np.testing.assert_array_equal(regions[1].ravel(), [0, 1, 0, 1, 1, 0])  # TC {1, 4}
    np.testing.assert_array_equal(regions[2].ravel(), [0, 0, 0, 1, 1, 0])  # ET {4}
    np.testing.assert_array_equal(make_label(seg, "multiclass").ravel(), [0, 1, 2, 3, 3, 2])


def test_invalid_options_are_rejected_up_front():
    with pytest.raises(ValueError, match="modalities"):
        PreprocessOptions(modalities=("flair", "dwi"))
    with pytest.raises(ValueError, match="repeat"):
        PreprocessOptions(modalities=("flair", "flair"))
    with pytest.raises(ValueError, match="label_mode"):
        PreprocessOptions(label_mode="et")
    with pytest.raises(ValueError, match="spacing"):
        PreprocessOptions(spacing=0.0)


# ----------------------------------------------------------------------------------------------- one case


def test_preprocessed_case_keeps_every_brain_voxel_and_the_whole_tumour(tmp_path):
    write_case(tmp_path, "BraTS19_A_1")
    images, seg = synthetic_volumes()
    image, label, attrs = preprocess_case(the_case(tmp_path, "BraTS19_A_1"))
    start, stop = attrs["bbox_start"], attrs["bbox_stop_exclusive"]
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    flair = images["flair"]
    assert np.count_nonzero(flair[box]) == np.count_nonzero(flair)  # every brain voxel is inside
    for axis in range(3):  # and the box is tight: its first and last slices hold brain
        assert np.take(flair[box], 0, axis=axis).any() and np.take(flair[box], -1, axis=axis).any()
    assert image.shape == label.shape == tuple(b - a for a, b in zip(start, stop))
    assert image.dtype == np.float32 and label.dtype == np.uint8
    np.testing.assert_array_equal(label, (seg[box] > 0).astype(np.uint8))
    brain = flair[box] > 0
    assert abs(float(image[brain].mean())) < 1e-4 and abs(float(image[brain].std()) - 1) < 1e-4
    assert attrs["modalities"] == ["flair"] and attrs["label_mode"] == "wt"
    assert attrs["source_files"] == ["BraTS19_A_1_flair.nii.gz", "BraTS19_A_1_seg.nii.gz"]
    np.testing.assert_array_equal(attrs["original_shape"], SHAPE)
    np.testing.assert_array_equal(attrs["original_affine"], LPS)


def test_restoring_the_label_reproduces_the_original_exactly(tmp_path):
    write_case(tmp_path, "BraTS19_A_1", modalities=("flair",))
    _, seg = synthetic_volumes()
    case = the_case(tmp_path, "BraTS19_A_1")
    for label_mode, expected in [("wt", (seg > 0)), ("multiclass", np.where(seg == 4, 3, seg))]:
        _, label, attrs = preprocess_case(case, label_mode=label_mode)
        restored = restore_to_original(label, attrs)
        assert restored.shape == SHAPE and restored.dtype == np.uint8
        np.testing.assert_array_equal(restored, expected.astype(np.uint8))


def test_stored_affine_puts_each_voxel_where_the_original_had_it(tmp_path):
    write_case(tmp_path, "BraTS19_A_1", modalities=("flair",))
    images, _ = synthetic_volumes()
    case = the_case(tmp_path, "BraTS19_A_1")
    image_xyz, _, attrs_xyz = preprocess_case(case)
    image_zyx, _, attrs_zyx = preprocess_case(case, axis_order="zyx")
    np.testing.assert_array_equal(image_zyx, image_xyz.transpose(2, 1, 0))
    start = attrs_xyz["bbox_start"]
    for stored in [(0, 0, 0), (3, 5, 7), tuple(np.asarray(image_xyz.shape) - 1)]:
        file_index = np.asarray(stored) + start
        world = LPS @ np.append(file_index, 1.0)
        np.testing.assert_allclose(attrs_xyz["affine"] @ np.append(stored, 1.0), world)
        np.testing.assert_allclose(attrs_zyx["affine"] @ np.append(stored[::-1], 1.0), world)
    np.testing.assert_array_equal(attrs_zyx["shape"], image_xyz.shape[::-1])


def test_zyx_labels_restore_to_the_original_nifti_order(tmp_path):
    write_case(tmp_path, "BraTS19_A_1", modalities=("flair",))
    _, seg = synthetic_volumes()
    _, label, attrs = preprocess_case(the_case(tmp_path, "BraTS19_A_1"), label_mode="regions", axis_order="zyx")
    assert label.shape[0] == 3
    restored = restore_to_original(label, attrs)
    np.testing.assert_array_equal(restored[2], (seg == 4).astype(np.uint8))


def test_several_modalities_are_stacked_as_channels_in_the_order_asked(tmp_path):
    write_case(tmp_path, "BraTS19_A_1")
    case = the_case(tmp_path, "BraTS19_A_1")
    image, label, attrs = preprocess_case(case, modalities=("t2", "flair", "t1ce"), label_mode="regions")
    assert image.shape[0] == 3 and image.shape[1:] == label.shape[1:] and label.shape[0] == 3
    assert attrs["modalities"] == ["t2", "flair", "t1ce"]
    # all modalities share the brain mask here, so each channel equals that modality processed alone
    for channel, modality in enumerate(("t2", "flair", "t1ce")):
        alone, _, _ = preprocess_case(case, modalities=(modality,))
        np.testing.assert_array_equal(image[channel], alone)


def test_resampling_gives_the_target_grid_and_maps_back(tmp_path):
    affine = LPS @ np.diag([1.0, 1.0, 2.0, 1.0])  # anisotropic source: 1 x 1 x 2 mm
    write_case(tmp_path, "BraTS19_A_1", modalities=("flair",), affine=affine)
    _, seg = synthetic_volumes()
    image, label, attrs = preprocess_case(the_case(tmp_path, "BraTS19_A_1"), spacing=2.0)
    box_shape = attrs["bbox_stop_exclusive"] - attrs["bbox_start"]
    expected = tuple(max(1, round(n * s / 2.0)) for n, s in zip(box_shape, (1.0, 1.0, 2.0)))
    assert image.shape == label.shape == expected
    assert expected[2] == box_shape[2]  # the 2 mm axis keeps its voxel count
    np.testing.assert_allclose(attrs["spacing"], 2.0, rtol=0.1)
    assert attrs["resampled"] and attrs["target_spacing"] == 2.0
    restored = restore_to_original(label, attrs)
    assert restored.shape == SHAPE
    truth = seg > 0
    dice = 2 * np.sum(restored * truth) / (restored.sum() + truth.sum())
    assert dice > 0.8
    # the tumour's centre in world coordinates is the same through either affine (to within a voxel)
    centre_stored = attrs["affine"] @ np.append(np.argwhere(label > 0).mean(axis=0), 1.0)
    centre_original = affine @ np.append(np.argwhere(truth).mean(axis=0), 1.0)
    np.testing.assert_allclose(centre_stored[:3], centre_original[:3], atol=1.0)


# ---------------------------------------------------------------------------------------------------- h5 io


def test_h5_round_trip_keeps_dtypes_and_geometry(tmp_path):
    write_case(tmp_path / "raw", "BraTS19_A_1", modalities=("flair",))
    image, label, attrs = preprocess_case(the_case(tmp_path / "raw", "BraTS19_A_1"))
    path = write_case_h5(tmp_path / "out" / "data" / "BraTS19_A_1.h5", image, label, attrs)
    assert is_valid_h5(path)
    with h5py.File(path, "r") as f:
        assert f["image"].dtype == np.float32 and f["label"].dtype == np.uint8
    image2, label2, attrs2 = read_case_h5(path)
    np.testing.assert_array_equal(image2, image)
    np.testing.assert_array_equal(label2, label)
    assert attrs2["case"] == "BraTS19_A_1" and attrs2["modalities"] == ["flair"] and attrs2["resampled"] is False
    assert "target_spacing" not in attrs2  # None is not stored
    np.testing.assert_array_equal(restore_to_original(label2, read_h5_attrs(path)), restore_to_original(label, attrs))
    assert [p.name for p in path.parent.iterdir()] == ["BraTS19_A_1.h5"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600: others may read the data


def test_broken_h5_files_are_not_valid(tmp_path):
    good = tmp_path / "good.h5"
    write_case_h5(good, np.zeros((4, 4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), {})
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[:700])
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file")
    no_label = tmp_path / "no_label.h5"
    with h5py.File(no_label, "w") as f:
        f["image"] = np.zeros((4, 4, 4), np.float32)
    wrong_dtype = tmp_path / "wrong_dtype.h5"
    with h5py.File(wrong_dtype, "w") as f:
        f["image"] = np.zeros((4, 4, 4), np.float32)
        f["label"] = np.zeros((4, 4, 4), np.int64)
    assert is_valid_h5(good)
    for path in (truncated, garbage, no_label, wrong_dtype, tmp_path / "missing.h5"):
        assert not is_valid_h5(path), path.name


def test_existing_valid_output_is_skipped_unless_overwrite(tmp_path):
    write_case(tmp_path / "raw", "BraTS19_A_1", modalities=("flair",))
    case = the_case(tmp_path / "raw", "BraTS19_A_1")
    data = tmp_path / "out" / "data"
    options = PreprocessOptions()
    assert process_case_to_h5(case, data, options) == "written"
    path = data / "BraTS19_A_1.h5"
    os.utime(path, (1_000_000, 1_000_000))
    assert process_case_to_h5(case, data, options) == "skipped"
    assert path.stat().st_mtime == 1_000_000
    with pytest.raises(CaseError, match=r"^BraTS19_A_1: .*exists.*label_mode='wt' \(asked 'regions'\)"):
        process_case_to_h5(case, data, PreprocessOptions(label_mode="regions"))
    assert process_case_to_h5(case, data, options, overwrite=True) == "written"
    assert path.stat().st_mtime != 1_000_000
    path.write_bytes(b"half-written by some other tool")  # an invalid file is redone
    assert process_case_to_h5(case, data, options) == "written" and is_valid_h5(path)


# ------------------------------------------------------------------------------------------------ bad input


def _corrupt(folder: Path, name: str) -> None:
    (folder / f"{name}_flair.nii.gz").write_bytes(gzip.compress(b"\x00" * 40) + b"garbage")


def _truncated(folder: Path, name: str) -> None:
    path = folder / f"{name}_flair.nii.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _not_gzip(folder: Path, name: str) -> None:
    (folder / f"{name}_seg.nii.gz").write_bytes(b"this is not a nifti file at all")


def _shape_mismatch(folder: Path, name: str) -> None:
    _, seg = synthetic_volumes()
    nib.save(nib.Nifti1Image(seg[:-2], LPS), folder / f"{name}_seg.nii.gz")


def _all_zero(folder: Path, name: str) -> None:
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), LPS), folder / f"{name}_flair.nii.gz")


def _nan(folder: Path, name: str) -> None:
    images, _ = synthetic_volumes()
    flair = images["flair"].astype(np.float32)
    flair[20, 18, 15] = np.nan
    flair[21, 18, 15] = np.inf
    nib.save(nib.Nifti1Image(flair, LPS), folder / f"{name}_flair.nii.gz")


def _label_three(folder: Path, name: str) -> None:
    _, seg = synthetic_volumes()
    seg[seg == 1] = 3
    nib.save(nib.Nifti1Image(seg, LPS), folder / f"{name}_seg.nii.gz")


def _label_outside_brain_box(folder: Path, name: str) -> None:
    _, seg = synthetic_volumes()
    seg[0, 0, 0] = 2
    nib.save(nib.Nifti1Image(seg, LPS), folder / f"{name}_seg.nii.gz")


def _remove(suffix: str):
    def remove(folder: Path, name: str) -> None:
        (folder / f"{name}_{suffix}.nii.gz").unlink()

    return remove


BAD_INPUTS = {
    "missing_flair": (_remove("flair"), r"missing FLAIR file \(expected BraTS19_Bad_1_flair\.nii\.gz"),
    "missing_seg": (_remove("seg"), r"missing seg file"),
    "missing_requested_t1": (_remove("t1"), r"missing t1 file"),
    "shape_mismatch": (_shape_mismatch, r"BraTS19_Bad_1_seg\.nii\.gz has shape \(38, 36, 30\) but .*\(40, 36, 30\)"),
    "corrupt_gzip": (_corrupt, r"cannot read BraTS19_Bad_1_flair\.nii\.gz"),
    "truncated_gzip": (_truncated, r"cannot read BraTS19_Bad_1_flair\.nii\.gz"),
    "not_nifti": (_not_gzip, r"cannot read BraTS19_Bad_1_seg\.nii\.gz"),
    "all_zero": (_all_zero, r"BraTS19_Bad_1_flair\.nii\.gz is all zero"),
    "nan_inf": (_nan, r"BraTS19_Bad_1_flair\.nii\.gz has 2 NaN/inf voxels"),
    "label_3": (_label_three, r"labels outside \{0, 1, 2, 4\}: 3$"),
    "label_outside_box": (_label_outside_brain_box, r"1 tumour voxels .* outside the brain bounding box"),
}


@pytest.mark.parametrize("problem", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_naming_the_case_and_writes_nothing(tmp_path, problem):
    damage, message = BAD_INPUTS[problem]
    folder = write_case(tmp_path / "raw", "BraTS19_Bad_1", modalities=("flair", "t1"))
    damage(folder, "BraTS19_Bad_1")
    data = tmp_path / "out" / "data"
    data.mkdir(parents=True)
    with pytest.raises(CaseError, match=r"^BraTS19_Bad_1: .*" + message) as info:
        process_case_to_h5(the_case(tmp_path / "raw", "BraTS19_Bad_1"), data, PreprocessOptions(("flair", "t1")))
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError) and info.value.case == "BraTS19_Bad_1"
    assert list(data.iterdir()) == []  # neither a .h5 nor a temporary file


# ---------------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize(
    "n, expected",
    [(335, (250, 25, 60)), (3, (1, 1, 1)), (4, (2, 1, 1)), (32, (24, 2, 6)), (2, (2, 0, 0)), (1, (1, 0, 0))],
)
def test_split_sizes_follow_250_25_60_of_335(n, expected):
    # hand-computed: 32 * 25 / 335 = 2.39 -> 2, 32 * 60 / 335 = 5.73 -> 6
    assert split_sizes(n) == expected


def test_generated_split_is_seeded_disjoint_and_complete(tmp_path):
    names = [f"BraTS19_{i:03d}_1" for i in range(335)]
    splits = make_splits(names, seed=1337, out_dir=tmp_path / "a")
    assert [len(splits[s]) for s in ("train", "val", "test")] == [250, 25, 60]
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == names
    assert splits["train"][:25] != sorted(splits["train"][:25])  # shuffled: the first N lines are a random draw
    for split, listed in splits.items():
        assert (tmp_path / "a" / f"{split}.txt").read_text().splitlines() == listed
    assert make_splits(list(reversed(names)), seed=1337, out_dir=tmp_path / "b") == splits
    assert make_splits(names, seed=1, out_dir=tmp_path / "c") != splits
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [SPLIT_MANIFEST, "test.txt", "train.txt", "val.txt"]


def _existing_split(root: Path, lists: dict[str, list[str]], with_h5: list[str], newline: str = "\r\n") -> None:
    (root / "data").mkdir(parents=True)
    for name in with_h5:
        (root / "data" / f"{name}.h5").touch()
    for split, names in lists.items():
        (root / f"{split}.txt").write_text("".join(f"{n}{newline}" for n in names) + newline, newline="")


def test_existing_split_lists_are_used_as_they_are(tmp_path):
    lists = {"train": ["c", "a"], "val": ["d"], "test": ["b"]}
    _existing_split(tmp_path, lists, with_h5=["a", "b", "c", "d", "e"])
    assert make_splits(["a", "b", "c", "d", "e"], seed=0, out_dir=tmp_path) == lists
    assert (tmp_path / "train.txt").read_bytes() == b"c\r\na\r\n\r\n"  # left untouched


@pytest.mark.parametrize(
    "lists, with_h5, message",
    [
        (
            {"train": ["a", "x"], "val": ["b"], "test": ["c"]},
            ["a", "b", "c"],
            r"train\.txt lists 1 case.* without an h5.*: x",
        ),
        (
            {"train": ["a", "b"], "val": ["b"], "test": ["c"]},
            ["a", "b", "c"],
            r"'b' is listed in train\.txt and val\.txt",
        ),
        ({"train": ["a", "a"], "val": ["b"], "test": ["c"]}, ["a", "b", "c"], r"'a' is listed twice in train\.txt"),
        ({"train": ["a"], "test": ["c"]}, ["a", "c"], r"lacks val\.txt"),
        ({"train": [], "val": ["b"], "test": ["c"]}, ["b", "c"], r"train\.txt is empty"),
    ],
)
def test_broken_split_lists_are_rejected(tmp_path, lists, with_h5, message):
    _existing_split(tmp_path, lists, with_h5)
    with pytest.raises(ValueError, match=message):
        make_splits(with_h5, seed=0, out_dir=tmp_path)


def _lists(root: Path) -> dict[str, list[str]]:
    return {s: (root / f"{s}.txt").read_text().splitlines() for s in ("train", "val", "test")}


def _h5_stubs(root: Path, names: list[str]) -> None:
    (root / "data").mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / "data" / f"{name}.h5").touch()


def test_own_split_is_remade_when_a_case_is_added_and_equals_a_fresh_one(tmp_path):
    # the failed-then-fixed case of issue #21: the first run wrote a split without "e"
    names = ["a", "b", "c", "d", "e"]
    _h5_stubs(tmp_path, names)
    make_splits(names[:4], seed=3, out_dir=tmp_path)
    notes: list[str] = []
    splits = make_splits(names, seed=3, out_dir=tmp_path, log=notes.append)
    assert sorted(sum(splits.values(), [])) == names
    assert splits == make_splits(names, seed=3, out_dir=tmp_path / "fresh")  # as if no case had ever failed
    assert _lists(tmp_path) == splits
    assert len(notes) == 1 and "added: e" in notes[0] and "remaking" in notes[0]


def test_own_split_is_remade_without_a_case_that_now_fails(tmp_path):
    _h5_stubs(tmp_path, ["a", "b", "c", "d"])
    make_splits(["a", "b", "c", "d"], seed=0, out_dir=tmp_path)
    notes: list[str] = []
    splits = make_splits(["a", "b", "c"], seed=0, out_dir=tmp_path, log=notes.append)
    assert sorted(sum(splits.values(), [])) == ["a", "b", "c"]
    assert "removed: d" in notes[0]


def test_own_split_is_kept_for_the_same_cases_even_with_a_new_seed(tmp_path):
    names = [f"c{i}" for i in range(8)]
    _h5_stubs(tmp_path, names)
    first = make_splits(names, seed=0, out_dir=tmp_path)
    stamp = (tmp_path / "train.txt").stat().st_mtime_ns
    notes: list[str] = []
    assert make_splits(names, seed=5, out_dir=tmp_path, log=notes.append) == first
    assert (tmp_path / "train.txt").stat().st_mtime_ns == stamp
    assert len(notes) == 1 and "made with seed 0" in notes[0]
    assert make_splits(names, seed=0, out_dir=tmp_path, log=notes.append) == first
    assert len(notes) == 1  # nothing to say when nothing changed


def test_an_own_split_edited_by_the_user_becomes_theirs_and_is_never_changed(tmp_path):
    names = ["a", "b", "c", "d", "e"]
    _h5_stubs(tmp_path, names)
    make_splits(names[:4], seed=0, out_dir=tmp_path)
    edited = _lists(tmp_path)
    edited["train"] = list(reversed(edited["train"]))  # the user reorders the labelled cases
    (tmp_path / "train.txt").write_text("".join(f"{n}\n" for n in edited["train"]))
    notes: list[str] = []
    assert make_splits(names, seed=0, out_dir=tmp_path, log=notes.append) == edited
    assert _lists(tmp_path) == edited
    assert "taken as your own" in notes[0]


def test_a_user_split_without_manifest_is_never_changed_when_cases_are_added(tmp_path):
    lists = {"train": ["b", "a"], "val": ["c"], "test": ["d"]}
    _existing_split(tmp_path, lists, with_h5=["a", "b", "c", "d", "e"])
    before = {s: (tmp_path / f"{s}.txt").read_bytes() for s in lists}
    notes: list[str] = []
    assert make_splits(["a", "b", "c", "d", "e"], seed=0, out_dir=tmp_path, log=notes.append) == lists
    assert {s: (tmp_path / f"{s}.txt").read_bytes() for s in lists} == before
    assert notes == [] and not (tmp_path / SPLIT_MANIFEST).exists()


def test_a_deleted_own_list_is_remade(tmp_path):
    names = [f"c{i}" for i in range(6)]
    _h5_stubs(tmp_path, names)
    first = make_splits(names, seed=2, out_dir=tmp_path)
    (tmp_path / "val.txt").unlink()
    assert make_splits(names, seed=2, out_dir=tmp_path) == first
    assert _lists(tmp_path) == first


def test_a_broken_manifest_leaves_the_lists_to_the_user(tmp_path):
    names = ["a", "b", "c", "d"]
    _h5_stubs(tmp_path, names + ["e"])
    first = make_splits(names, seed=0, out_dir=tmp_path)
    (tmp_path / SPLIT_MANIFEST).write_text("{not json")
    notes: list[str] = []
    assert make_splits(names + ["e"], seed=0, out_dir=tmp_path, log=notes.append) == first
    assert "not a split manifest" in notes[0]


def test_write_case_h5_on_a_full_disk_raises_enospc_and_leaves_nothing(tmp_path, monkeypatch):
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        if fd <= 2:
            return real_write(fd, data)
        real_write(fd, bytes(data)[: len(data) // 2])  # half of it lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    image = np.zeros((4, 5, 6), np.float32)
    with pytest.raises(OSError) as info:
        write_case_h5(tmp_path / "case.h5", image, image.astype(np.uint8), {"case": "x"})
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------- real data


def _check_real_case(case: CaseFiles, image: np.ndarray, label: np.ndarray, attrs: dict) -> None:
    flair = np.asanyarray(nib.load(str(case.images["flair"])).dataobj)
    seg = np.asanyarray(nib.load(str(case.seg)).dataobj)
    box = tuple(slice(a, b) for a, b in zip(attrs["bbox_start"], attrs["bbox_stop_exclusive"]))
    assert np.count_nonzero(flair[box]) == np.count_nonzero(flair)
    np.testing.assert_array_equal(attrs["original_shape"], flair.shape)
    np.testing.assert_array_equal(attrs["original_affine"], nib.load(str(case.images["flair"])).affine)
    restored = restore_to_original(label if label.ndim == 3 else label[0], attrs)
    np.testing.assert_array_equal(restored, (seg > 0).astype(np.uint8))
    channel = image if image.ndim == 3 else image[0]
    brain = flair[box] > 0
    if attrs["axis_order"] == "zyx":
        brain = brain.T
    # the statistics come from the clipped brain voxels, which are exactly the voxels > 0 of the original
    assert math.isclose(float(channel[brain].mean()), 0.0, abs_tol=1e-4)
    assert math.isclose(float(channel[brain].std()), 1.0, abs_tol=1e-4)


def test_real_case_keeps_its_brain_and_tumour(real_data_dir):
    case = find_cases(real_data_dir)[0]
    image, label, attrs = preprocess_case(case)
    assert image.ndim == 3 and label.shape == image.shape
    _check_real_case(case, image, label, attrs)


@pytest.mark.slow
def test_real_case_with_four_modalities_regions_and_zyx(real_data_dir):
    case = next(c for c in find_cases(real_data_dir) if len(c.images) == 4)
    image, label, attrs = preprocess_case(case, ("flair", "t1", "t1ce", "t2"), "regions", axis_order="zyx")
    assert image.shape[0] == 4 and label.shape[0] == 3 and image.shape[1:] == label.shape[1:]
    _check_real_case(case, image, label, attrs)


def test_resample_labels_keeps_each_coarse_voxel_the_class_that_covers_most_of_it():
    label = np.zeros((4, 4, 4), dtype=np.uint8)
    label[:2, :2, :2] = 1  # fills the first coarse voxel
    label[2:, 2:, 2:] = 2
    label[2, 2, 2] = 0  # 7 of 8 fine voxels are still class 2
    label[0, 3, 3] = 1  # 1 of 8: outvoted by the background
    expected = np.zeros((2, 2, 2), dtype=np.uint8)
    expected[0, 0, 0], expected[1, 1, 1] = 1, 2
    np.testing.assert_array_equal(resample_labels(label, (2, 2, 2)), expected)


def test_resample_case_file_halves_the_grid_and_records_the_spacing(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(20, 16, 12)).astype(np.float32)
    label = np.zeros((20, 16, 12), dtype=np.uint8)
    label[4:12, 4:12, 2:10] = 1
    src = write_case_h5(tmp_path / "src.h5", image, label, {"source": "test"})
    shape = resample_case_file(src, tmp_path / "out" / "dst.h5", 0.625, 1.25)
    out_image, out_label, attrs = read_case_h5(tmp_path / "out" / "dst.h5")
    assert shape == out_image.shape == out_label.shape == (10, 8, 6)
    np.testing.assert_allclose(attrs["spacing"], [1.25] * 3)
    assert attrs["source"] == "test" and attrs["resampled_from_mm"] == 0.625
    assert out_label.sum() == 4 * 4 * 4  # the 8^3 block is exactly 4^3 coarse voxels
    assert abs(float(out_image.mean()) - float(image.mean())) < 0.05
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(CaseError, match="bad.h5: not a readable case file"):
        resample_case_file(tmp_path / "bad.h5", tmp_path / "out" / "bad.h5", 0.625, 1.25)
    assert not (tmp_path / "out" / "bad.h5").exists()
