"""Tests of code/prepare_dataset.py through ``main([...])`` on tiny nnU-Net v2 and MSD raw folders."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import prepare_dataset
from dataloaders.case_checks import check_split_cases
from dataloaders.raw_datasets import zscore_foreground
from synthetic_raw import AFFINE, SHAPE, case_arrays, write_msd_raw, write_nifti, write_nnunet_raw


def run(raw: Path, out: Path, *extra: str) -> int:
    return prepare_dataset.main(["--raw_dir", str(raw), "--out_dir", str(out), *extra])


def read_lists(out: Path) -> dict[str, list[str]]:
    return {s: (out / f"{s}.txt").read_text().splitlines() for s in ("train", "val", "test", "unlabeled")}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def leftovers(out: Path, name: str) -> list[str]:
    """Files of case ``name`` in ``<out>/data``: the h5, or a temporary ``.<name>.h5.XXXXXXXX.part.h5``."""
    data = out / "data"
    if not data.is_dir():
        return []
    return sorted(p.name for p in data.iterdir() if p.name == f"{name}.h5" or p.name.startswith(f".{name}.h5"))


@pytest.fixture()
def nnunet_raw(tmp_path) -> Path:
    """3 labelled cases, 1 unlabelled in imagesTr, 1 in imagesUnlabelled/; labels listed as 0, 4, 2 (remapped)."""
    return write_nnunet_raw(
        tmp_path / "Dataset001_Synthetic",
        extra_unlabelled=("case_x",),
        labels={"background": 0, "tumour": 4, "edema": 2},
    )


def test_nnunet_folder_gives_h5_files_lists_and_dataset_json(nnunet_raw, tmp_path):
    out = tmp_path / "out"
    assert run(nnunet_raw, out) == 0
    assert sorted(p.name for p in (out / "data").iterdir()) == [f"case_{n}.h5" for n in "abcux"]
    with h5py.File(out / "data" / "case_b.h5") as f:
        assert f["image"].shape == (2, *SHAPE) and f["image"].dtype == np.float32
        assert f["label"].shape == SHAPE and f["label"].dtype == np.uint8
        assert f["image"].compression == "gzip" and f["label"].compression == "gzip"
        channels, raw_label = case_arrays(1, values=(0, 4, 2))
        np.testing.assert_allclose(f["image"][1], zscore_foreground(channels[1]), rtol=1e-5, atol=1e-5)  # ADC second
        np.testing.assert_array_equal(f["label"][()], np.select([raw_label == 4, raw_label == 2], [1, 2], 0))
        attrs = dict(f.attrs)
    np.testing.assert_allclose(attrs["affine"], AFFINE, rtol=1e-6)
    np.testing.assert_allclose(attrs["original_affine"], AFFINE, rtol=1e-6)
    np.testing.assert_allclose(attrs["spacing"], [1.5, 1.2, 2.0], rtol=1e-6)
    assert list(attrs["original_shape"]) == list(SHAPE)
    assert json.loads(attrs["channel_names"]) == ["T2", "ADC"]
    assert json.loads(attrs["labels"]) == {"background": 0, "tumour": 1, "edema": 2}
    for name in ("case_u", "case_x"):
        with h5py.File(out / "data" / f"{name}.h5") as f:
            assert sorted(f) == ["image"]  # no fake label for an unlabelled case

    lists = read_lists(out)
    labelled = lists["train"] + lists["val"] + lists["test"]
    assert sorted(labelled) == ["case_a", "case_b", "case_c"] and len(set(labelled)) == 3
    assert lists["unlabeled"] == ["case_u", "case_x"]
    summary = json.loads((out / "dataset.json").read_text())
    assert {k: summary[k] for k in ("name", "source_layout", "channel_names", "labels", "num_classes", "in_channels",
                                    "cases", "unlabeled")} == {
        "name": "Synthetic", "source_layout": "nnunet", "channel_names": ["T2", "ADC"],
        "labels": {"background": 0, "tumour": 1, "edema": 2}, "num_classes": 3, "in_channels": 2,
        "cases": 3, "unlabeled": 2,
    }
    assert summary["source_label_values"] == {"background": 0, "tumour": 4, "edema": 2}


def test_output_passes_the_trainers_split_checks(nnunet_raw, tmp_path):
    out = tmp_path / "out"
    assert run(nnunet_raw, out) == 0
    lists = read_lists(out)
    labelled = set(lists["train"] + lists["val"] + lists["test"])
    check_split_cases(out, lists, labelled=labelled)  # raises on overlap, a missing file or a missing label


def test_rerun_keeps_the_split_and_rewrites_the_files(nnunet_raw, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(nnunet_raw, out) == 0
    lists = read_lists(out)
    assert run(nnunet_raw, out, "--seed", "5") == 0
    assert read_lists(out) == lists  # make_splits keeps its own split while the labelled cases are the same
    assert "kept the split" in capsys.readouterr().err


def test_msd_folder_with_4d_images_is_prepared(tmp_path):
    raw = write_msd_raw(tmp_path / "Task05_Prostate", labelled=("p_0", "p_1", "p_2", "p_3"), unlabelled=("p_9",))
    out = tmp_path / "out"
    assert run(raw, out) == 0
    with h5py.File(out / "data" / "p_2.h5") as f:
        channels, raw_label = case_arrays(2)
        assert f["image"].shape == (2, *SHAPE)
        for c in range(2):
            np.testing.assert_allclose(f["image"][c], zscore_foreground(channels[c]), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(f["label"][()], raw_label)
        assert f.attrs["source_layout"] == "msd"
    lists = read_lists(out)
    assert sorted(lists["train"] + lists["val"] + lists["test"]) == ["p_0", "p_1", "p_2", "p_3"]
    assert lists["unlabeled"] == ["p_9"]
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["source_layout"] == "msd" and summary["labels"] == {"background": 0, "PZ": 1, "TZ": 2}


def test_no_unlabelled_case_gives_an_empty_unlabeled_list(tmp_path):
    raw = write_nnunet_raw(tmp_path / "raw", unlabelled=())
    out = tmp_path / "out"
    assert run(raw, out) == 0
    assert (out / "unlabeled.txt").read_text() == ""
    assert json.loads((out / "dataset.json").read_text())["unlabeled"] == 0


def test_split_is_seeded(tmp_path):
    raw = write_nnunet_raw(tmp_path / "raw", labelled=tuple(f"case_{i:02d}" for i in range(8)), unlabelled=())
    assert run(raw, tmp_path / "one", "--seed", "3") == 0
    assert run(raw, tmp_path / "two", "--seed", "3") == 0
    assert read_lists(tmp_path / "one") == read_lists(tmp_path / "two")
    assert run(raw, tmp_path / "three", "--seed", "4") == 0
    assert read_lists(tmp_path / "one") != read_lists(tmp_path / "three")


def test_spacing_crop_and_ct_options_reach_the_files(tmp_path):
    raw = write_msd_raw(tmp_path / "Task09_Spleen", modalities={"0": "CT"})
    out = tmp_path / "out"
    assert run(raw, out, "--spacing", "3", "--crop", "--normalisation", "ct") == 0
    summary = json.loads((out / "dataset.json").read_text())
    props = summary["ct_properties"][0]
    with h5py.File(out / "data" / "prostate_00.h5") as f:
        assert f["image"].ndim == 3 and f.attrs["normalisation"] == "ct"
        assert f.attrs["cropped"] and f.attrs["target_spacing"] == 3.0
        bound = (np.array([props["percentile_00_5"], props["percentile_99_5"]]) - props["mean"]) / props["std"]
        assert f["image"][()].min() >= bound[0] - 1e-4 and f["image"][()].max() <= bound[1] + 1e-4
    assert summary["spacing"] == 3.0 and summary["crop"] is True


def test_workers_give_the_same_files(nnunet_raw, tmp_path):
    assert run(nnunet_raw, tmp_path / "one") == 0
    assert run(nnunet_raw, tmp_path / "two", "--workers", "2") == 0
    for name in ("case_a", "case_x"):
        one, two = (tmp_path / run_dir / "data" / f"{name}.h5" for run_dir in ("one", "two"))
        with h5py.File(one) as a, h5py.File(two) as b:
            assert sorted(a) == sorted(b)
            for key in a:
                np.testing.assert_array_equal(a[key][()], b[key][()])
    assert read_lists(tmp_path / "one") == read_lists(tmp_path / "two")


# --------------------------------------------------------------------------------------------------- bad input


def break_missing_channel(raw: Path) -> tuple[str, str]:
    (raw / "imagesTr" / "case_b_0001.nii.gz").unlink()
    return "case_b", "case_b_0001.nii.gz is missing; dataset.json lists 2 channel(s)"


def break_label_value(raw: Path) -> tuple[str, str]:
    _, label = case_arrays(0, values=(0, 4, 2))
    label[0, 0, 0] = 7
    write_nifti(raw / "labelsTr" / "case_a.nii.gz", label)
    return "case_a", "case_a.nii.gz has label values 7; expected only the values of dataset.json labels (0, 4, 2)"


def break_channel_shapes(raw: Path) -> tuple[str, str]:
    write_nifti(raw / "imagesTr" / "case_c_0001.nii.gz", np.ones((20, 18, 15), np.float32))
    return "case_c", "case_c_0001.nii.gz has shape (20, 18, 15) but"


def break_label_shape(raw: Path) -> tuple[str, str]:
    write_nifti(raw / "labelsTr" / "case_a.nii.gz", np.zeros((19, 18, 16), np.int16))
    return "case_a", "case_a.nii.gz has shape (19, 18, 16) but"


def break_unreadable_file(raw: Path) -> tuple[str, str]:
    (raw / "imagesTr" / "case_u_0000.nii.gz").write_bytes(b"\x1f\x8b truncated")
    return "case_u", "cannot read"


BREAKERS = [break_missing_channel, break_label_value, break_channel_shapes, break_label_shape, break_unreadable_file]


@pytest.mark.parametrize("breaker", BREAKERS)
def test_a_bad_case_is_one_line_naming_the_file_exit_1_and_leaves_no_h5(nnunet_raw, tmp_path, capsys, breaker):
    name, message = breaker(nnunet_raw)
    out = tmp_path / "out"
    assert run(nnunet_raw, out) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}: ") and message in lines[0]
    assert str(nnunet_raw) in lines[0]  # the file is named with its path
    assert leftovers(out, name) == []
    assert name not in sum(read_lists(out).values(), [])
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(
        f"case_{n}.h5" for n in "abcux" if f"case_{n}" != name
    )


def test_msd_image_with_another_channel_count_fails_its_case(tmp_path, capsys):
    raw = write_msd_raw(tmp_path / "Task05_Prostate", labelled=("p_0", "p_1", "p_2", "p_3"))
    images, _ = case_arrays(0, channels=3)
    write_nifti(raw / "imagesTr" / "p_1.nii.gz", np.stack(images, axis=-1))
    out = tmp_path / "out"
    assert run(raw, out) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1
    assert f"p_1: {raw / 'imagesTr' / 'p_1.nii.gz'} has shape (20, 18, 16, 3) but dataset.json lists 2" in lines[0]
    assert leftovers(out, "p_1") == []


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda raw: (raw / "dataset.json").unlink(), "has no dataset.json; expected an nnU-Net v2 raw folder"),
        (lambda raw: (raw / "dataset.json").write_text("{"), "dataset.json is not valid JSON"),
        (lambda raw: (raw / "dataset.json").write_text('{"name": "x"}'), "dataset.json is in no known layout"),
        (
            lambda raw: (raw / "dataset.json").write_text(json.dumps({
                "channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "wt": [1, 2]},
                "file_ending": ".nii.gz"})),
            "label 'wt' is a region [1, 2]",
        ),
    ],
)
def test_a_bad_dataset_json_is_one_line_exit_1_and_writes_nothing(nnunet_raw, tmp_path, capsys, setup, message):
    setup(nnunet_raw)
    out = tmp_path / "out"
    assert run(nnunet_raw, out) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and str(nnunet_raw) in err
    assert not out.exists()


def test_a_folder_in_no_layout_names_it(tmp_path, capsys):
    folder = tmp_path / "somewhere"
    folder.mkdir()
    assert run(folder, tmp_path / "out") == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {folder} has no dataset.json; expected an nnU-Net v2 raw folder (dataset.json with 'channel_names', "
        "'labels', 'file_ending'; imagesTr/, labelsTr/) or a Medical Segmentation Decathlon task folder (dataset.json "
        "with 'modality', 'labels', 'training'; imagesTr/, labelsTr/)"
    )


def test_stale_temporary_files_are_removed(nnunet_raw, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    stale = out / "data" / ".case_a.h5.abcd1234.part.h5"
    stale.write_bytes(b"half")
    assert run(nnunet_raw, out) == 0
    assert not stale.exists()
    assert "removed 1 unfinished temporary file(s)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "--workers must be >= 1"),
        (["--spacing", "-1"], "spacing must be a positive number"),
        (["--normalisation", "minmax"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_with_2(nnunet_raw, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        run(nnunet_raw, tmp_path / "out", *args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
