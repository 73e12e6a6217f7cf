from __future__ import annotations

import numpy as np
import pytest
import torch

from dataloaders.transforms import (
    CenterCrop,
    Compose,
    RandomCrop,
    RandomIntensity,
    RandomNoise,
    RandomRotFlip,
    RandomRotFlipCrop,
    ToTensor,
    crop_or_pad,
    parse_patch_size,
    rot_flip,
)


def coded_volume(shape):
    """Each voxel holds 100 * x + 10 * y + z, so a crop's first voxel tells its offset."""
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (100 * x + 10 * y + z + 1).astype(np.float32)  # +1: padding (0) differs from voxel (0, 0, 0)


def sample_of(shape):
    image = coded_volume(shape)
    return {"image": image, "label": (image % 7).astype(np.uint8), "name": "case"}


# ---------------------------------------------------------------- RandomRotFlip


def test_rot_flip_applies_the_same_rotation_and_flip_to_image_and_label():
    rng = np.random.default_rng(0)
    t = RandomRotFlip(rng=rng)
    for _ in range(20):
        out = t(sample_of((4, 6, 3)))
        np.testing.assert_array_equal(out["label"], (out["image"] % 7).astype(np.uint8))
        assert out["name"] == "case"


def test_rot_flip_reaches_exactly_the_four_distinct_rot_flip_results():
    # flip0(rot90^k) == flip1(rot90^(k+2)): the 8 draws give 4 distinct volumes
    image = coded_volume((4, 6, 3))
    expected = {np.flip(np.rot90(image, k, axes=(0, 1)), axis=a).tobytes() for k in range(4) for a in (0, 1)}
    assert len(expected) == 4
    t = RandomRotFlip(rng=np.random.default_rng(1))
    seen = {t({"image": image})["image"].tobytes() for _ in range(200)}
    assert seen == expected


def test_rot_flip_with_global_seed_draws_k_then_axis_like_the_released_code():
    image = coded_volume((5, 5, 2))
    np.random.seed(123)
    expected = []
    for _ in range(10):
        k = np.random.randint(0, 4)
        axis = np.random.randint(0, 2)
        expected.append(np.flip(np.rot90(image, k), axis=axis))
    np.random.seed(123)
    t = RandomRotFlip()
    for want in expected:
        np.testing.assert_array_equal(t({"image": image})["image"], want)


def test_rot_flip_of_multichannel_image_turns_every_channel_like_the_label():
    rng = np.random.default_rng(2)
    base = coded_volume((4, 4, 3))
    sample = {"image": np.stack([base, -base]), "label": (base % 5).astype(np.uint8)}
    for _ in range(10):
        out = RandomRotFlip(rng=rng)(sample)
        assert out["image"].shape == (2, 4, 4, 3)
        np.testing.assert_array_equal(out["image"][1], -out["image"][0])
        np.testing.assert_array_equal(out["label"], (out["image"][0] % 5).astype(np.uint8))


def test_rot_flip_output_converts_with_torch_from_numpy():
    out = RandomRotFlip(rng=np.random.default_rng(3))(sample_of((3, 3, 3)))
    torch.from_numpy(out["image"])  # raises on negative strides


# ---------------------------------------------------------------- RandomCrop


def test_random_crop_reaches_every_offset_including_the_last():
    shape, size = (6, 5, 4), (4, 3, 2)
    image = coded_volume(shape)
    t = RandomCrop(size, rng=np.random.default_rng(0))
    seen = set()
    for _ in range(600):
        out = t({"image": image, "label": (image % 7).astype(np.uint8)})
        assert out["image"].shape == size
        first = int(out["image"][0, 0, 0]) - 1
        offset = (first // 100, first // 10 % 10, first % 10)
        np.testing.assert_array_equal(
            out["image"], image[offset[0] : offset[0] + 4, offset[1] : offset[1] + 3, offset[2] : offset[2] + 2]
        )
        np.testing.assert_array_equal(out["label"], (out["image"] % 7).astype(np.uint8))
        seen.add(offset)
    assert seen == {(a, b, c) for a in range(3) for b in range(3) for c in range(3)}


def test_random_crop_of_a_volume_equal_to_the_patch_returns_it_unpadded():
    # the original padded 3 voxels per side whenever dim <= patch
    image = coded_volume((4, 3, 2))
    out = RandomCrop((4, 3, 2), rng=np.random.default_rng(0))({"image": image})
    np.testing.assert_array_equal(out["image"], image)


def test_random_crop_zero_pads_short_axes_split_left_and_right():
    image = coded_volume((3, 5, 2))
    label = np.ones((3, 5, 2), dtype=np.uint8)
    t = RandomCrop((6, 5, 5), rng=np.random.default_rng(0))
    out = t({"image": image, "label": label})
    assert out["image"].shape == (6, 5, 5)
    # axis 0: 3 missing -> 1 before, 2 after; axis 2: 3 missing -> 1 before, 2 after
    expected = np.zeros((6, 5, 5), dtype=np.float32)
    expected[1:4, :, 1:3] = image
    np.testing.assert_array_equal(out["image"], expected)
    assert out["label"].sum() == 3 * 5 * 2
    assert out["label"][1:4, :, 1:3].all()


def test_random_crop_pads_one_axis_and_draws_offsets_on_the_others():
    image = coded_volume((2, 7, 3))
    t = RandomCrop((4, 4, 3), rng=np.random.default_rng(5))
    starts = set()
    for _ in range(100):
        out = t({"image": image})["image"]
        assert (out[0] == 0).all() and (out[3] == 0).all()
        starts.add(int(out[1, 0, 0] - 1) // 10 % 10)
    assert starts == {0, 1, 2, 3}


def test_random_crop_with_global_seed_is_reproducible():
    image = coded_volume((8, 8, 8))
    np.random.seed(7)
    a = [RandomCrop((3, 3, 3))({"image": image})["image"] for _ in range(5)]
    np.random.seed(7)
    b = [RandomCrop((3, 3, 3))({"image": image})["image"] for _ in range(5)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_crop_or_pad_fills_outside_the_source_with_the_fill_value():
    source = np.arange(4, dtype=np.int16).reshape(1, 1, 4)
    out = crop_or_pad(source, (0, -1, 2), (1, 2, 3), fill=-5)
    np.testing.assert_array_equal(out, np.array([[[-5, -5, -5], [2, 3, -5]]], dtype=np.int16))


def test_crop_or_pad_does_not_return_a_view_of_the_source():
    source = coded_volume((4, 4, 4))
    out = crop_or_pad(source, (0, 0, 0), (2, 2, 2))
    out[...] = -1
    assert source.min() == 1


@pytest.mark.parametrize("bad", [96, "96", "969696", (96, 96), (96, 96, 0), (96, -1, 96), (96.0, 96, 96), (True, 1, 1)])
def test_patch_size_must_be_three_positive_ints(bad):
    with pytest.raises(ValueError, match="three positive ints"):
        RandomCrop(bad)
    with pytest.raises(ValueError, match="three positive ints"):
        CenterCrop(bad)


def test_patch_size_accepts_lists_and_numpy_ints():
    assert parse_patch_size([np.int64(96), 80, 64]) == (96, 80, 64)
    assert parse_patch_size(np.array([16, 16, 32])) == (16, 16, 32)


def test_image_and_label_shapes_must_agree():
    with pytest.raises(ValueError, match="label shape"):
        RandomCrop((2, 2, 2))({"image": np.zeros((4, 4, 4)), "label": np.zeros((4, 4, 3))})


# ---------------------------------------------------------------- CenterCrop


def test_center_crop_takes_the_floor_centred_window():
    image = coded_volume((10, 9, 7))
    out = CenterCrop((4, 4, 4))({"image": image, "label": (image % 7).astype(np.uint8)})
    # starts: (10-4)//2 = 3, (9-4)//2 = 2, (7-4)//2 = 1
    np.testing.assert_array_equal(out["image"], image[3:7, 2:6, 1:5])
    np.testing.assert_array_equal(out["label"], (image[3:7, 2:6, 1:5] % 7).astype(np.uint8))


def test_center_crop_pads_short_axes():
    image = coded_volume((2, 6, 3))
    out = CenterCrop((5, 2, 3))({"image": image})["image"]
    expected = np.zeros((5, 2, 3), dtype=np.float32)
    expected[1:3] = image[:, 2:4, :]  # axis 0: pad 1 before, 2 after; axis 1: start (6-2)//2 = 2
    np.testing.assert_array_equal(out, expected)


# ---------------------------------------------------------------- ToTensor, intensity, Compose


def test_to_tensor_adds_a_channel_and_makes_the_label_long():
    out = ToTensor()(
        {"image": np.zeros((3, 4, 5), dtype=np.float64), "label": np.ones((3, 4, 5), np.uint8), "name": "a"}
    )
    assert out["image"].shape == (1, 3, 4, 5) and out["image"].dtype == torch.float32
    assert out["label"].shape == (3, 4, 5) and out["label"].dtype == torch.int64
    assert out["name"] == "a"


def test_to_tensor_keeps_a_multichannel_image():
    out = ToTensor()({"image": np.zeros((2, 3, 4, 5), dtype=np.float32), "label": np.zeros((3, 4, 5), np.uint8)})
    assert out["image"].shape == (2, 3, 4, 5)


def test_random_intensity_is_an_affine_map_of_the_image_within_the_ranges():
    image = coded_volume((3, 3, 3))
    label = (image % 3).astype(np.uint8)
    t = RandomIntensity((0.5, 2.0), (-1.0, 1.0), rng=np.random.default_rng(0))
    for _ in range(10):
        out = t({"image": image, "label": label})
        scale = (out["image"][1, 0, 0] - out["image"][0, 0, 0]) / (image[1, 0, 0] - image[0, 0, 0])
        shift = out["image"][0, 0, 0] - scale * image[0, 0, 0]
        assert 0.5 <= scale <= 2.0 and -1.0 <= shift <= 1.0
        np.testing.assert_allclose(out["image"], image * scale + shift, rtol=1e-5, atol=1e-3)
        np.testing.assert_array_equal(out["label"], label)


def test_random_intensity_rejects_a_reversed_range():
    with pytest.raises(ValueError, match="low <= high"):
        RandomIntensity(scale_range=(1.1, 0.9))


def test_random_noise_is_bounded_by_two_sigma():
    image = np.zeros((8, 8, 8), dtype=np.float32)
    out = RandomNoise(sigma=0.1, rng=np.random.default_rng(0))({"image": image})["image"]
    assert np.abs(out).max() <= 0.2 + 1e-7 and out.std() > 0.05


def test_compose_of_the_released_pipeline_gives_patch_tensors():
    t = Compose(
        [RandomRotFlip(rng=np.random.default_rng(0)), RandomCrop((4, 4, 4), rng=np.random.default_rng(1)), ToTensor()]
    )
    out = t(sample_of((6, 5, 7)))
    assert out["image"].shape == (1, 4, 4, 4) and out["label"].shape == (4, 4, 4)
    torch.testing.assert_close(out["label"], (out["image"][0] % 7).long())


class _RecordingSource:
    """An array stand-in (like an ``h5py.Dataset``) that counts the voxels read through it."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.voxels_read = array, array.shape, array.dtype, 0

    def __getitem__(self, index):
        out = np.asarray(self.array[index])
        self.voxels_read += out.size
        return out


@pytest.mark.parametrize(
    "shape, size",
    [((12, 10, 8), (6, 4, 5)), ((9, 14, 7), (8, 8, 7)), ((10, 10, 10), (10, 10, 10)), ((5, 12, 6), (8, 4, 9)),
     ((6, 6, 3), (7, 7, 4))],
)
@pytest.mark.parametrize("make_rng", [np.random.RandomState, np.random.default_rng])
def test_rot_flip_crop_equals_rot_flip_then_crop_draw_for_draw(shape, size, make_rng):
    for seed in range(12):
        sample = sample_of(shape)
        sample["image"] = np.stack([sample["image"], -sample["image"]])  # (C, D, H, W) works too
        fused = RandomRotFlipCrop(size, rng=make_rng(seed))(sample)
        rng = make_rng(seed)
        want = Compose([RandomRotFlip(rng), RandomCrop(size, rng)])(sample)
        for key in ("image", "label"):
            assert fused[key].shape == want[key].shape
            np.testing.assert_array_equal(fused[key], want[key])
        assert fused["name"] == "case"


def test_rot_flip_crop_reads_only_the_patch_when_it_fits():
    volume = coded_volume((20, 16, 12))
    t = RandomRotFlipCrop((8, 6, 5), rng=np.random.default_rng(3))
    for _ in range(10):
        params = t.get_params(volume.shape)
        source = _RecordingSource(volume)
        patch = t.read(source, params)
        assert source.voxels_read == 8 * 6 * 5  # the box, not the 3840-voxel volume
        k, axis, start = params
        np.testing.assert_array_equal(patch, crop_or_pad(rot_flip(volume, k, axis), start, (8, 6, 5)))
        assert patch.flags["C_CONTIGUOUS"]


def test_rot_flip_crop_reads_the_whole_volume_when_the_plane_needs_padding():
    volume = coded_volume((6, 16, 12))
    t = RandomRotFlipCrop((8, 6, 5), rng=np.random.default_rng(0))
    params = (0, 0, (-1, 2, 3))  # no rotation: axis 0 (6) is shorter than the patch (8)
    assert t.source_box(volume.shape, params) is None
    source = _RecordingSource(volume)
    patch = t.read(source, params)
    assert source.voxels_read == volume.size
    np.testing.assert_array_equal(patch, crop_or_pad(rot_flip(volume, 0, 0), (-1, 2, 3), (8, 6, 5)))
