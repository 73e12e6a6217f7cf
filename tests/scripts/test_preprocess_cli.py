"""Tests of code/preprocess_brats2019.py: in-process through ``main([...])`` and once as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import preprocess_brats2019
from dataloaders.preprocess import is_valid_h5, read_case_h5

CODE_DIR = Path(preprocess_brats2019.__file__).resolve().parent
SHAPE = (24, 22, 20)
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_case(root: Path, name: str, seed: int, corrupt_flair: bool = False) -> None:
    """A tiny BraTS-like case: ellipsoid brain (int16, background 0) and a tumour blob labelled 1/2/4."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    c = np.asarray(SHAPE) / 2.0
    brain = ((x - c[0]) / 9) ** 2 + ((y - c[1]) / 8) ** 2 + ((z - c[2]) / 7) ** 2 <= 1
    r = np.sqrt((x - c[0] - 2) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
    seg = np.select([r <= 1.5, r <= 2.5, r <= 4], [1, 4, 2], 0).astype(np.int16)
    flair = rng.integers(100, 500, size=SHAPE).astype(np.int16)
    flair[~brain] = 0
    folder = root / name
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(flair, AFFINE), folder / f"{name}_flair.nii.gz")
    nib.save(nib.Nifti1Image(seg, AFFINE), folder / f"{name}_seg.nii.gz")
    if corrupt_flair:
        (folder / f"{name}_flair.nii.gz").write_bytes(b"\x1f\x8b truncated")


@pytest.fixture()
def raw(tmp_path) -> Path:
    """Four good cases in the release layout (HGG/LGG)."""
    root = tmp_path / "MICCAI_BraTS_2019_Data_Training"
    for i, name in enumerate(["BraTS19_A_1", "BraTS19_B_1", "BraTS19_C_1"]):
        write_case(root / "HGG", name, seed=i)
    write_case(root / "LGG", "BraTS19_D_1", seed=3)
    return root


def read_lists(out: Path) -> dict[str, list[str]]:
    return {s: (out / f"{s}.txt").read_text().splitlines() for s in ("train", "val", "test")}


def test_writes_one_h5_per_case_and_split_lists(raw, tmp_path, capsys):
    out = tmp_path / "out"
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out)]) == 0
    names = ["BraTS19_A_1", "BraTS19_B_1", "BraTS19_C_1", "BraTS19_D_1"]
    assert sorted(p.name for p in (out / "data").iterdir()) == [f"{n}.h5" for n in names]
    assert all(is_valid_h5(out / "data" / f"{n}.h5") for n in names)
    lists = read_lists(out)
    assert [len(lists[s]) for s in ("train", "val", "test")] == [2, 1, 1]  # round(4 * 25/335) = 0 -> 1
    assert sorted(lists["train"] + lists["val"] + lists["test"]) == names
    assert "4 written, 0 skipped" in capsys.readouterr().out


def test_rerun_skips_done_cases_and_keeps_the_split(raw, tmp_path, capsys):
    out = tmp_path / "out"
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out)]) == 0
    lists = read_lists(out)
    stamp = (out / "data" / "BraTS19_A_1.h5").stat().st_mtime_ns
    capsys.readouterr()
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out), "--seed", "7"]) == 0
    assert "0 written, 4 skipped" in capsys.readouterr().out
    assert (out / "data" / "BraTS19_A_1.h5").stat().st_mtime_ns == stamp
    assert read_lists(out) == lists  # existing lists win over a new seed
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out), "--overwrite"]) == 0
    assert "4 written, 0 skipped" in capsys.readouterr().out


def test_a_bad_case_is_reported_skipped_and_fails_the_run(raw, tmp_path, capsys):
    write_case(raw / "LGG", "BraTS19_Bad_1", seed=9, corrupt_flair=True)
    out = tmp_path / "out"
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "BraTS19_Bad_1: cannot read BraTS19_Bad_1_flair.nii.gz" in err
    assert "1 case(s) failed" in err
    files = sorted(p.name for p in (out / "data").iterdir())
    assert files == ["BraTS19_A_1.h5", "BraTS19_B_1.h5", "BraTS19_C_1.h5", "BraTS19_D_1.h5"]  # nothing for the bad one
    assert "BraTS19_Bad_1" not in sum(read_lists(out).values(), [])


def test_strict_stops_at_the_first_bad_case(raw, tmp_path, capsys):
    write_case(raw / "HGG", "BraTS19_0Bad_1", seed=9, corrupt_flair=True)  # sorts first
    out = tmp_path / "out"
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out), "--strict"]) == 1
    assert "BraTS19_0Bad_1: cannot read" in capsys.readouterr().err
    assert list((out / "data").iterdir()) == []
    assert not (out / "train.txt").exists()


def test_options_reach_the_files_and_workers_give_the_same_result(raw, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--raw_dir", str(raw), "--label_mode", "multiclass", "--spacing", "2"]
    assert preprocess_brats2019.main([*common, "--out_dir", str(one)]) == 0
    assert preprocess_brats2019.main([*common, "--out_dir", str(two), "--workers", "2"]) == 0
    for name in ["BraTS19_A_1", "BraTS19_D_1"]:
        image1, label1, attrs = read_case_h5(one / "data" / f"{name}.h5")
        image2, label2, _ = read_case_h5(two / "data" / f"{name}.h5")
        np.testing.assert_array_equal(image1, image2)
        np.testing.assert_array_equal(label1, label2)
        assert attrs["label_mode"] == "multiclass" and attrs["target_spacing"] == 2.0
        assert set(np.unique(label1)) <= {0, 1, 2, 3} and 3 in label1
    assert read_lists(one) == read_lists(two)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "--workers must be >= 1"),
        (["--modalities", "dwi"], "invalid choice"),
        (["--spacing", "-1"], "spacing must be a positive number"),
    ],
)
def test_bad_arguments_exit_with_2(raw, tmp_path, capsys, args, message):
    argv = ["--raw_dir", str(raw), "--out_dir", str(tmp_path / "out"), *args]
    try:
        code = preprocess_brats2019.main(argv)
    except SystemExit as exit_:  # argparse errors exit directly
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_or_empty_raw_dir_exits_with_2(tmp_path, capsys):
    assert preprocess_brats2019.main(["--raw_dir", str(tmp_path / "none"), "--out_dir", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert preprocess_brats2019.main(["--raw_dir", str(tmp_path / "empty"), "--out_dir", str(tmp_path / "o")]) == 2
    assert "no case folders" in capsys.readouterr().err


def test_script_exits_nonzero_for_a_failing_case(tmp_path):
    raw = tmp_path / "raw"
    write_case(raw, "BraTS19_A_1", seed=0)
    write_case(raw, "BraTS19_Bad_1", seed=1, corrupt_flair=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "preprocess_brats2019.py", "--raw_dir", str(raw), "--out_dir", str(tmp_path / "out")],
        cwd=CODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "BraTS19_Bad_1: cannot read BraTS19_Bad_1_flair.nii.gz" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "data").iterdir()) == ["BraTS19_A_1.h5"]
