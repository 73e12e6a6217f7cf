from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataloaders.brats2019 import BraTS2019, read_split_file
from dataloaders.transforms import Compose, RandomCrop, RandomRotFlip, RandomRotFlipCrop, ToTensor
from synthetic_h5 import write_synthetic_h5_dataset


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    write_synthetic_h5_dataset(root, n_cases=6, shape=(12, 10, 8), seed=0)
    return root


def write_case(root, name, **datasets):
    (root / "data").mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "data" / f"{name}.h5", "w") as f:
        for key, value in datasets.items():
            f.create_dataset(key, data=value)


def test_original_import_path_still_works():
    from dataloaders.brats2019 import (  # noqa: F401
        BraTS2019,
        CenterCrop,
        RandomCrop,
        RandomRotFlip,
        ToTensor,
        TwoStreamBatchSampler,
    )


def test_reads_the_cases_named_in_the_split_file_in_order(root):
    names = (root / "train.txt").read_text().split()
    ds = BraTS2019(root, split="train")
    assert len(ds) == len(names) == 4
    for i, name in enumerate(names):
        sample = ds[i]
        with h5py.File(root / "data" / f"{name}.h5", "r") as f:
            np.testing.assert_array_equal(sample["image"], f["image"][:])
            np.testing.assert_array_equal(sample["label"], f["label"][:])
        assert sample["image"].dtype == np.float32 and sample["label"].dtype == np.uint8
        assert sample["name"] == name


def test_num_keeps_the_first_names(root):
    names = (root / "train.txt").read_text().split()
    assert BraTS2019(root, "train", num=2).image_list == names[:2]


@pytest.mark.parametrize("num", [0, -1, 2.0, True])
def test_num_must_be_a_positive_int(root, num):
    with pytest.raises(ValueError, match="num must be a positive int"):
        BraTS2019(root, "train", num=num)


def test_num_larger_than_the_split_is_an_error(root):
    with pytest.raises(ValueError, match="num=9 but .*train.txt lists only 4 cases"):
        BraTS2019(root, "train", num=9)


def test_split_file_with_crlf_and_blank_lines(tmp_path):
    (tmp_path / "train.txt").write_bytes(b"a\r\n\r\n  b \r\n\nc")
    for name in "abc":
        write_case(tmp_path, name, image=np.zeros((2, 2, 2), np.float32), label=np.zeros((2, 2, 2), np.uint8))
    assert BraTS2019(tmp_path, "train").image_list == ["a", "b", "c"]


def test_split_file_naming_a_case_twice_is_an_error(tmp_path):
    (tmp_path / "val.txt").write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="more than once.*'a'"):
        read_split_file(tmp_path / "val.txt")


def test_missing_split_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"split file not found: .*test\.txt"):
        BraTS2019(tmp_path, split="test")


def test_missing_case_file_is_reported_at_construction_with_its_path(tmp_path):
    (tmp_path / "train.txt").write_text("present\nabsent\n")
    write_case(tmp_path, "present", image=np.zeros((2, 2, 2), np.float32), label=np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"1 case file\(s\).*data/absent\.h5"):
        BraTS2019(tmp_path, "train")


def test_case_file_removed_after_construction_raises_file_not_found(tmp_path):
    (tmp_path / "train.txt").write_text("a\n")
    write_case(tmp_path, "a", image=np.zeros((2, 2, 2), np.float32), label=np.zeros((2, 2, 2), np.uint8))
    ds = BraTS2019(tmp_path, "train")
    (tmp_path / "data" / "a.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"data/a\.h5"):
        ds[0]


def test_missing_label_dataset_names_the_file(tmp_path):
    (tmp_path / "train.txt").write_text("nolabel\n")
    write_case(tmp_path, "nolabel", image=np.zeros((2, 2, 2), np.float32))
    ds = BraTS2019(tmp_path, "train")
    with pytest.raises(ValueError, match=r"nolabel\.h5 has no 'label' dataset \(found: \['image'\]\)"):
        ds[0]


def test_image_and_label_of_different_shapes_are_rejected(tmp_path):
    (tmp_path / "train.txt").write_text("bad\n")
    write_case(tmp_path, "bad", image=np.zeros((2, 2, 2), np.float32), label=np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="bad.h5: image .* and label .* must share"):
        BraTS2019(tmp_path, "train")[0]


def test_files_are_closed_after_each_access(root):
    ds = BraTS2019(root, "val")
    ds[0]
    assert h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE) == []


def test_index_out_of_range_raises_index_error(root):
    ds = BraTS2019(root, "test")
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataset_pickles_and_reads_the_same_after(root):
    ds = BraTS2019(root, "train")
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[1]["image"], ds[1]["image"])


def test_patch_read_from_disk_equals_the_patch_cropped_from_the_full_volume(root):
    lazy = BraTS2019(root, "train", transform=RandomCrop((6, 12, 5), rng=np.random.default_rng(4)))
    plain = BraTS2019(root, "train")
    crop = RandomCrop((6, 12, 5), rng=np.random.default_rng(4))
    for i in range(len(lazy)):
        for _ in range(3):
            got, want = lazy[i], crop(plain[i])
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["label"], want["label"])


def test_patch_read_from_disk_through_compose_then_the_rest_of_the_pipeline(root):
    lazy = BraTS2019(
        root, "train", transform=Compose([RandomCrop((4, 4, 4), rng=np.random.default_rng(1)), ToTensor()])
    )
    plain = BraTS2019(root, "train")
    crop = RandomCrop((4, 4, 4), rng=np.random.default_rng(1))
    got, want = lazy[0], crop(plain[0])
    assert got["image"].shape == (1, 4, 4, 4) and got["label"].dtype == torch.int64
    np.testing.assert_array_equal(got["image"][0].numpy(), want["image"])


def test_rot_flip_crop_reads_the_same_patches_from_disk_as_the_released_pipeline_from_memory(root):
    lazy = BraTS2019(root, "train", transform=Compose([RandomRotFlipCrop((8, 6, 5)), ToTensor()]))
    plain = BraTS2019(root, "train", transform=Compose([RandomRotFlip(), RandomCrop((8, 6, 5)), ToTensor()]))
    for i in range(len(lazy)):
        for seed in range(4):  # the global np.random stream, as in the DataLoader workers
            np.random.seed(seed)
            got = lazy[i]
            np.random.seed(seed)
            want = plain[i]
            assert torch.equal(got["image"], want["image"]) and torch.equal(got["label"], want["label"])


def test_default_collate_batches_the_training_pipeline(root):
    transform = Compose([RandomRotFlip(), RandomCrop((8, 8, 8)), ToTensor()])
    ds = BraTS2019(root, "train", transform=transform)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 1, 8, 8, 8) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, 8, 8, 8) and batch["label"].dtype == torch.int64
    assert batch["name"] == ds.image_list[:2]


def test_synthetic_h5_helper_writes_splits_and_a_bright_tumour(tmp_path):
    names = write_synthetic_h5_dataset(tmp_path, n_cases=10, shape=(16, 16, 16), seed=1, empty=[0])
    assert [len(read_split_file(tmp_path / f"{s}.txt")) for s in ("train", "val", "test")] == [6, 2, 2]
    assert sum((read_split_file(tmp_path / f"{s}.txt") for s in ("train", "val", "test")), []) == names
    for i, name in enumerate(names):
        with h5py.File(tmp_path / "data" / f"{name}.h5", "r") as f:
            image, label = f["image"][:], f["label"][:]
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape == (16, 16, 16)
        if i == 0:
            assert not label.any()
        else:
            assert label.any() and image[label == 1].mean() > image[label == 0].mean() + 1.0
