"""Tests of dataloaders/raw_datasets.py on tiny nnU-Net v2 and MSD raw folders (tests/synthetic_raw.py)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from dataloaders.preprocess import CaseError, resample_to_shape
from dataloaders.raw_datasets import (
    PrepareOptions,
    RawDatasetError,
    ct_intensity_properties,
    ct_normalise,
    prepare_case,
    read_raw_dataset,
    remap_labels,
    stored_affine,
    write_prepared_case,
    zscore_foreground,
)
from synthetic_raw import AFFINE, SHAPE, case_arrays, write_msd_raw, write_nifti, write_nnunet_raw


def case_named(dataset, name):
    return next(c for c in dataset.cases if c.name == name)


# ------------------------------------------------------------------------------------------------ discovery


def test_nnunet_folder_is_read_with_channels_labels_and_unlabelled_cases(tmp_path):
    raw = write_nnunet_raw(tmp_path / "raw", extra_unlabelled=("case_x",))
    dataset = read_raw_dataset(raw)
    assert dataset.layout == "nnunet" and dataset.name == "Synthetic"
    assert dataset.channel_names == ("T2", "ADC")
    assert dataset.labels == (("background", 0), ("tumour", 1), ("edema", 2))
    assert [c.name for c in dataset.cases] == ["case_a", "case_b", "case_c", "case_u", "case_x"]
    assert [c.labelled for c in dataset.cases] == [True, True, True, False, False]
    assert [p.name for p in case_named(dataset, "case_a").images] == ["case_a_0000.nii.gz", "case_a_0001.nii.gz"]
    assert case_named(dataset, "case_x").images[0].parent.name == "imagesUnlabelled"
    assert all(c.problem is None for c in dataset.cases) and dataset.notes == ()


def test_msd_folder_is_read_with_4d_images_and_hidden_files_skipped(tmp_path):
    raw = write_msd_raw(tmp_path / "Task05_Prostate", unlabelled=("prostate_09",))
    dataset = read_raw_dataset(raw)
    assert dataset.layout == "msd" and dataset.channel_names == ("T2", "ADC")
    assert dataset.labels == (("background", 0), ("PZ", 1), ("TZ", 2))
    assert [c.name for c in dataset.cases] == ["prostate_00", "prostate_01", "prostate_02", "prostate_09"]
    assert all(c.channels_in_file for c in dataset.cases)
    assert [c.labelled for c in dataset.cases] == [True, True, True, False]


def test_nnunet_v1_style_msd_folder_with_one_file_per_channel_is_read(tmp_path):
    raw = write_msd_raw(tmp_path / "Task05", labelled=("p_00", "p_01"))
    for name in ("p_00", "p_01"):  # split the 4-D files into x_0000 / x_0001 as nnU-Net v1 stored them
        images, _ = case_arrays(0)
        (raw / "imagesTr" / f"{name}.nii.gz").unlink()
        for c, data in enumerate(images):
            write_nifti(raw / "imagesTr" / f"{name}_{c:04d}.nii.gz", data)
    dataset = read_raw_dataset(raw)
    assert [c.name for c in dataset.cases] == ["p_00", "p_01"]
    assert [p.name for p in dataset.cases[0].images] == ["p_00_0000.nii.gz", "p_00_0001.nii.gz"]
    assert not dataset.cases[0].channels_in_file and dataset.cases[0].problem is None


def test_numtraining_that_differs_from_the_labels_found_gives_a_note(tmp_path):
    raw = write_nnunet_raw(tmp_path / "raw")
    meta = json.loads((raw / "dataset.json").read_text())
    (raw / "dataset.json").write_text(json.dumps({**meta, "numTraining": 9}))
    note = f"{raw / 'dataset.json'} says numTraining 9 but 3 labelled case(s) were found"
    assert read_raw_dataset(raw).notes == (note,)


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"foo": 1}, "is in no known layout"),
        ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "wt": [1, 2]}, "file_ending": ".nii.gz"},
         "label 'wt' is a region [1, 2]"),
        ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "ignore": 3}, "file_ending": ".nii.gz"},
         "the 'ignore' label"),
        ({"channel_names": {"0": "CT"}, "labels": {"organ": 1, "background": 0}, "file_ending": ".nii.gz"},
         "the first label must be the background with value 0"),
        ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "file_ending": ".mha"},
         "file_ending '.mha' is not supported"),
        ({"channel_names": {"1": "CT"}, "labels": {"background": 0}, "file_ending": ".nii.gz"},
         "the keys of 'channel_names' must be 0 .. 0"),
        ({"modality": {"0": "CT"}, "labels": {"0": "background"}, "training": [{"image": "x.nii.gz"}]},
         "training[0] must be"),
    ],
)
def test_a_bad_dataset_json_is_one_line_naming_the_file(tmp_path, meta, message):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(RawDatasetError) as err:
        read_raw_dataset(tmp_path)
    assert message in str(err.value) and str(tmp_path / "dataset.json") in str(err.value)
    assert "\n" not in str(err.value)


def test_a_missing_or_broken_dataset_json_names_the_folder_or_file(tmp_path):
    with pytest.raises(RawDatasetError, match=r"has no dataset.json; expected an nnU-Net v2 raw folder"):
        read_raw_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(RawDatasetError, match=r"dataset.json is not valid JSON"):
        read_raw_dataset(tmp_path)


def test_missing_and_extra_channel_files_and_orphan_labels_become_case_problems(tmp_path):
    raw = write_nnunet_raw(tmp_path / "raw")
    (raw / "imagesTr" / "case_b_0001.nii.gz").unlink()
    write_nifti(raw / "imagesTr" / "case_c_0002.nii.gz", np.ones(SHAPE, np.float32))
    write_nifti(raw / "labelsTr" / "case_z.nii.gz", np.zeros(SHAPE, np.int16))
    dataset = read_raw_dataset(raw)
    assert case_named(dataset, "case_a").problem is None
    assert "case_b_0001.nii.gz is missing; dataset.json lists 2 channel(s)" in case_named(dataset, "case_b").problem
    assert "case_c_0002.nii.gz is one channel too many" in case_named(dataset, "case_c").problem
    assert "case_z.nii.gz has no image; expected" in case_named(dataset, "case_z").problem


# ------------------------------------------------------------------------------------------------ array steps


def test_zscore_uses_the_nonzero_voxels_and_applies_to_every_voxel():
    image = np.array([0.0, 0.0, 1.0, 3.0])
    np.testing.assert_allclose(zscore_foreground(image), [-2.0, -2.0, -1.0, 1.0])  # mean 2, std 1
    with pytest.raises(ValueError, match="all zero"):
        zscore_foreground(np.zeros(4))
    with pytest.raises(ValueError, match="std 0"):
        zscore_foreground(np.array([0.0, 5.0, 5.0]))


def test_ct_statistics_clip_to_the_foreground_percentiles():
    samples = [np.arange(1000, dtype=np.float64), np.arange(1000, 1001, dtype=np.float64)]
    props = ct_intensity_properties(samples)
    low, high = np.percentile(np.arange(1001), [0.5, 99.5])
    assert props["percentile_00_5"] == pytest.approx(low) and props["percentile_99_5"] == pytest.approx(high)
    assert props["mean"] == pytest.approx(500.0) and props["num_samples"] == 1001
    out = ct_normalise(np.array([-1e4, 500.0, 1e4]), props)
    np.testing.assert_allclose(out, (np.array([low, 500.0, high]) - props["mean"]) / props["std"], rtol=1e-6)
    with pytest.raises(ValueError, match="no labelled foreground voxel"):
        ct_intensity_properties([np.empty(0)])


def test_labels_are_remapped_in_the_order_of_dataset_json_and_unknown_values_reported():
    labels = (("background", 0), ("tumour", 4), ("edema", 2))
    classes, unknown = remap_labels(np.array([[0, 4], [2, 4]], dtype=np.int16), labels)
    np.testing.assert_array_equal(classes, [[0, 1], [2, 1]])
    assert classes.dtype == np.uint8 and unknown == []
    _, unknown = remap_labels(np.array([0.0, 2.0, 2.5, 7.0]), labels)
    assert unknown == [2.5, 7.0]


def test_resampled_affine_keeps_the_world_position_of_the_volume_centre():
    affine = AFFINE
    shape_in, shape_out = (20, 18, 16), (10, 9, 8)
    out = stored_affine(affine, (0, 0, 0), shape_in, shape_out)
    centre_in = affine @ np.array([*(np.asarray(shape_in) - 1) / 2, 1.0])
    centre_out = out @ np.array([*(np.asarray(shape_out) - 1) / 2, 1.0])
    np.testing.assert_allclose(centre_out, centre_in)
    np.testing.assert_allclose(np.linalg.norm(out[:3, :3], axis=0), [3.0, 2.4, 4.0], rtol=1e-6)
    assert resample_to_shape(np.ones((1, 4, 4, 4)), (2, 2, 2), order=1).shape == (1, 2, 2, 2)


# ------------------------------------------------------------------------------------------------- one case


def test_prepared_case_keeps_channel_order_and_geometry(tmp_path):
    raw = write_nnunet_raw(tmp_path / "raw", labels={"background": 0, "tumour": 4, "edema": 2})
    dataset = read_raw_dataset(raw)
    image, label, attrs = prepare_case(case_named(dataset, "case_a"), dataset, PrepareOptions())
    channels, raw_label = case_arrays(0, values=(0, 4, 2))
    assert image.shape == (2, *SHAPE) and image.dtype == np.float32
    for c in range(2):  # channel c of the file is channel c of the array, z-scored on its own
        np.testing.assert_allclose(image[c], zscore_foreground(channels[c]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(label, np.select([raw_label == 4, raw_label == 2], [1, 2], 0))
    assert label.dtype == np.uint8
    np.testing.assert_allclose(attrs["affine"], AFFINE, rtol=1e-6)
    assert attrs["labels"] == json.dumps({"background": 0, "tumour": 1, "edema": 2})
    assert json.loads(attrs["channel_names"]) == ["T2", "ADC"]
    assert list(attrs["bbox_start"]) == [0, 0, 0] and list(attrs["bbox_stop_exclusive"]) == list(SHAPE)


def test_crop_keeps_every_labelled_voxel_and_shifts_the_affine(tmp_path):
    raw = write_nnunet_raw(tmp_path / "raw")
    dataset = read_raw_dataset(raw)
    case = case_named(dataset, "case_a")
    full_image, full_label, _ = prepare_case(case, dataset, PrepareOptions())
    image, label, attrs = prepare_case(case, dataset, PrepareOptions(crop=True))
    start, stop = attrs["bbox_start"], attrs["bbox_stop_exclusive"]
    assert image.shape[1:] == tuple(stop - start) and image.shape[1:] != SHAPE
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    np.testing.assert_array_equal(label, full_label[box])
    assert np.count_nonzero(label) == np.count_nonzero(full_label)
    np.testing.assert_allclose(attrs["affine"] @ [0, 0, 0, 1], AFFINE @ [*start, 1])


def test_single_channel_image_is_three_dimensional_and_resampled(tmp_path):
    raw = write_msd_raw(tmp_path / "Task09_Spleen", modalities={"0": "CT"})
    dataset = read_raw_dataset(raw)
    image, label, attrs = prepare_case(dataset.cases[0], dataset, PrepareOptions(spacing=3.0))
    expected = tuple(round(n * s / 3.0) for n, s in zip(SHAPE, (1.5, 1.2, 2.0)))
    assert image.shape == expected and label.shape == expected
    assert set(np.unique(label)) <= {0, 1, 2}
    assert attrs["resampled"] and attrs["target_spacing"] == 3.0
    np.testing.assert_allclose(attrs["spacing"], np.asarray(SHAPE) * [1.5, 1.2, 2.0] / expected, rtol=1e-6)


def test_msd_image_with_another_channel_count_is_a_case_error(tmp_path):
    raw = write_msd_raw(tmp_path / "Task01", modalities={"0": "FLAIR", "1": "T1", "2": "T2"})
    images, _ = case_arrays(0, channels=2)
    write_nifti(raw / "imagesTr" / "prostate_01.nii.gz", np.stack(images, axis=-1))
    dataset = read_raw_dataset(raw)
    expected = r"prostate_01: .*prostate_01.nii.gz has shape \(20, 18, 16, 2\) but dataset.json lists 3"
    with pytest.raises(CaseError, match=expected):
        prepare_case(case_named(dataset, "prostate_01"), dataset, PrepareOptions())


def test_unlabelled_case_is_written_without_a_label_dataset(tmp_path):
    raw = write_nnunet_raw(tmp_path / "raw")
    dataset = read_raw_dataset(raw)
    image, label, attrs = prepare_case(case_named(dataset, "case_u"), dataset, PrepareOptions())
    assert label is None and attrs["labelled"] is False
    path = write_prepared_case(tmp_path / "case_u.h5", image, label, attrs)
    with h5py.File(path) as f:
        assert sorted(f) == ["image"] and f["image"].shape == (2, *SHAPE)
        assert f["image"].compression == "gzip"
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".h5"] == ["case_u.h5"]  # no temporary file left
