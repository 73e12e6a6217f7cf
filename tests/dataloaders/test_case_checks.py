"""Tests of code/dataloaders/case_checks.py: split lists that overlap and listed case files that are bad."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

import dataloaders.case_checks as case_checks
from dataloaders.brats2019 import read_split_file
from dataloaders.case_checks import CaseFileError, SplitCheckError, check_case_file, check_split_cases
from synthetic_h5 import write_synthetic_h5_dataset


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, dict[str, list[str]]]:
    names = write_synthetic_h5_dataset(tmp_path, n_cases=8, shape=(6, 6, 6), seed=0)
    splits = {s: read_split_file(tmp_path / f"{s}.txt") for s in ("train", "val", "test")}
    assert sorted(sum(splits.values(), [])) == sorted(names)
    return tmp_path, splits


def _write(path: Path, **datasets: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value)


def test_a_good_dataset_passes_and_each_file_is_opened_once(dataset, monkeypatch):
    root, splits = dataset
    opened: list[str] = []
    real_file = h5py.File

    def counting_file(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_file(path, *args, **kwargs)

    monkeypatch.setattr(case_checks.h5py, "File", counting_file)
    check_split_cases(root, splits)
    assert sorted(opened) == sorted(f"{n}.h5" for n in sum(splits.values(), []))


def test_a_case_in_two_lists_is_refused_naming_it_and_both_lists(dataset):
    root, splits = dataset
    leaked = splits["val"][0]
    splits["train"].append(leaked)
    with pytest.raises(SplitCheckError) as info:
        check_split_cases(root, splits)
    message = str(info.value)
    assert message == (
        f"1 case(s) are listed more than once under {root}: {leaked!r} in train.txt and val.txt; "
        "a case belongs to one list only"
    )
    assert info.value.problems == [f"{leaked!r} in train.txt and val.txt"]


def test_a_case_twice_in_one_list_is_refused(dataset):
    root, splits = dataset
    splits["test"].append(splits["test"][0])
    with pytest.raises(SplitCheckError, match=rf"{splits['test'][0]!r} twice in test\.txt"):
        check_split_cases(root, splits)


def test_bad_files_are_all_named_in_one_line(dataset):
    root, splits = dataset
    train, val = splits["train"], splits["val"]
    data = root / "data"
    (data / f"{train[0]}.h5").unlink()  # missing
    (data / f"{train[1]}.h5").write_bytes(b"not hdf5 at all")  # not HDF5
    _write(data / f"{train[2]}.h5", image=np.zeros((6, 6, 6), np.float32))  # no label, labelled case
    _write(data / f"{val[0]}.h5", image=np.zeros((6, 6, 6), np.float32), label=np.zeros((6, 6, 5)))
    with pytest.raises(SplitCheckError) as info:
        check_split_cases(root, splits)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"4 of 8 listed case file(s) under {root} are missing or bad: ")
    assert message.endswith("; ... and 1 more")
    problems = info.value.problems
    assert problems[0] == f"case file {data / f'{train[0]}.h5'} does not exist"
    assert problems[1].startswith(f"{data / f'{train[1]}.h5'} is not a readable HDF5 case file")
    assert problems[2] == f"{data / f'{train[2]}.h5'} must hold datasets 'image' and 'label', found ['image']"
    assert problems[3] == (
        f"{data / f'{val[0]}.h5'}: image (6, 6, 6) and label (6, 6, 5) must share a 3-D spatial shape"
    )


def test_unlabelled_cases_need_only_an_image(dataset):
    root, splits = dataset
    unlabelled = splits["train"][-1]
    _write(root / "data" / f"{unlabelled}.h5", image=np.zeros((6, 6, 6), np.float32))
    labelled = set(sum(splits.values(), [])) - {unlabelled}
    check_split_cases(root, splits, labelled=labelled)
    with pytest.raises(SplitCheckError, match=rf"{unlabelled}\.h5 must hold datasets 'image' and 'label'"):
        check_split_cases(root, splits)


def test_labelled_cases_outside_the_lists_are_a_caller_error(dataset):
    root, splits = dataset
    with pytest.raises(ValueError, match=r"labelled names 1 case\(s\) that no split list holds: BraTS19_NOPE_1"):
        check_split_cases(root, splits, labelled={"BraTS19_NOPE_1"})


def test_check_case_file_refuses_a_2d_image_and_stays_importable_from_evaluate(tmp_path):
    _write(tmp_path / "flat.h5", image=np.zeros((6, 6), np.float32), label=np.zeros((6, 6), np.uint8))
    with pytest.raises(CaseFileError, match=r"image must be \(D, H, W\) or \(C, D, H, W\), found shape \(6, 6\)"):
        check_case_file(tmp_path / "flat.h5")
    from engine import evaluate

    assert evaluate.check_case_file is check_case_file and evaluate.CaseFileError is CaseFileError
