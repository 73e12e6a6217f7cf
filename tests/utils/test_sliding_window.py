"""Tests for utils/sliding_window.py: hand-worked windows, exact pointwise predictors, brute force, golden labels."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from utils.sliding_window import (
    gaussian_importance_map,
    pad_to_patch,
    predict_sliding_window,
    predict_volume_labels,
    sliding_window_probabilities,
    window_starts,
)


def requires_cuda(test):
    """Mark ``test`` as a CUDA check (``pytest -m cuda``), skipped without a device."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def window_mean_and_square(x: torch.Tensor) -> torch.Tensor:
    """A non-pointwise predictor: channel 0 = the window's mean (differs between overlapping windows), 1 = x^2."""
    return torch.cat([x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x), x**2], dim=1)


def original_sliding_window(predict, image: np.ndarray, patch, stride, weight=None) -> np.ndarray:
    """The released ``test_single_case`` algorithm (1 channel, numpy loops), optionally with blending weights."""
    shape = image.shape
    pads = [max(p - s, 0) for s, p in zip(shape, patch)]
    image = np.pad(image, [(pad // 2, pad - pad // 2) for pad in pads])
    counts = [math.ceil((s - p) / st) + 1 for s, p, st in zip(image.shape, patch, stride)]
    weight = np.ones(patch, np.float32) if weight is None else weight
    score, total = None, np.zeros(image.shape, np.float32)
    for ix, iy, iz in itertools.product(*[range(c) for c in counts]):
        xs, ys, zs = (min(st * i, s - p) for st, i, s, p in zip(stride, (ix, iy, iz), image.shape, patch))
        region = (slice(xs, xs + patch[0]), slice(ys, ys + patch[1]), slice(zs, zs + patch[2]))
        out = predict(torch.from_numpy(np.ascontiguousarray(image[region]))[None, None])[0].numpy()
        score = np.zeros((out.shape[0],) + image.shape, np.float32) if score is None else score
        score[(slice(None),) + region] += out * weight
        total[region] += weight
    score = score / total[None]
    return score[(slice(None),) + tuple(slice(pad // 2, pad // 2 + s) for pad, s in zip(pads, shape))]


# --- window_starts and pad_to_patch by hand -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, patch, stride, expected",
    [
        (100, 64, 32, [0, 32, 36]),  # ceil(36 / 32) + 1 = 3, the last one flush with the end
        (96, 64, 32, [0, 32]),  # exact fit: no extra window
        (155, 96, 64, [0, 59]),
        (65, 64, 1, [0, 1]),
        (64, 64, 32, [0]),
        (40, 64, 32, [0]),  # shorter than the patch (padded before use)
    ],
)
def test_window_starts_match_hand_worked_examples(size, patch, stride, expected):
    assert window_starts(size, patch, stride) == expected


@pytest.mark.parametrize("args", [(0, 64, 32), (100, 0, 32), (100, 64, 0), (100.0, 64, 32), (100, 64, -1)])
def test_window_starts_rejects_non_positive_or_non_int_arguments(args):
    with pytest.raises(ValueError, match="positive int"):
        window_starts(*args)


def test_pad_to_patch_splits_padding_like_the_original_and_unpad_undoes_it():
    image = torch.rand(2, 40, 70, 41) + 1.0  # > 0 so the zero padding is recognisable
    padded, unpad = pad_to_patch(image, (64, 64, 64))
    assert padded.shape == (2, 64, 70, 64)
    # D: pad 24 -> 12 before, 12 after; H: none; W: pad 23 -> 11 before, 12 after
    torch.testing.assert_close(padded[:, 12:52, :, 11:52], image, rtol=0, atol=0)
    assert padded[:, :12].abs().sum() == 0 and padded[:, 52:].abs().sum() == 0
    assert padded[..., :11].abs().sum() == 0 and padded[..., 52:].abs().sum() == 0
    torch.testing.assert_close(padded[unpad], image, rtol=0, atol=0)
    labels = torch.zeros(64, 70, 64)  # the same slicer crops a (D, H, W) label map
    assert labels[unpad].shape == (40, 70, 41)


def test_pad_to_patch_leaves_large_images_untouched():
    image = torch.rand(1, 65, 64, 70)
    padded, unpad = pad_to_patch(image, 64)
    assert padded is image and padded[unpad].shape == image.shape


# --- Gaussian importance map --------------------------------------------------------------------------------------


def test_gaussian_importance_map_matches_the_formula_by_hand():
    weights = gaussian_importance_map((9, 9, 9), sigma_scale=1 / 8)  # centre 4, sigma 9/8
    assert weights.shape == (9, 9, 9) and weights.dtype == torch.float32
    assert weights[4, 4, 4] == pytest.approx(1.0)
    assert weights[0, 4, 4] == pytest.approx(math.exp(-16 / (2 * 1.125**2)), rel=1e-5)
    assert weights[0, 0, 4] == pytest.approx(math.exp(-32 / (2 * 1.125**2)), rel=1e-5)
    torch.testing.assert_close(weights, torch.flip(weights, (0, 1, 2)))


def test_gaussian_importance_map_of_even_patch_is_symmetric_and_never_zero():
    weights = gaussian_importance_map((8, 6, 4), sigma_scale=0.01)  # underflows to 0 away from the centre
    assert bool((weights > 0).all())
    torch.testing.assert_close(weights, torch.flip(weights, (0, 1, 2)))
    with pytest.raises(ValueError, match="sigma_scale"):
        gaussian_importance_map(8, sigma_scale=0.0)


# --- predict_sliding_window ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("blend", ["uniform", "gaussian"])
@pytest.mark.parametrize("shape", [(1, 70, 130, 97), (2, 40, 40, 40), (1, 64, 64, 64)])
def test_pointwise_predictor_is_reproduced_exactly(shape, blend):
    image = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    out = predict_sliding_window(lambda x: x + 1, image, patch=(64, 64, 64), stride=(32, 32, 32), blend=blend)
    torch.testing.assert_close(out, image + 1)


@pytest.mark.parametrize("blend", ["uniform", "gaussian"])
@pytest.mark.parametrize("shape, stride", [((11, 6, 17), (3, 4, 5)), ((8, 20, 9), (8, 6, 2))])
def test_overlap_average_equals_the_original_algorithm(shape, stride, blend):
    image = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    patch = (8, 8, 8)
    weight = gaussian_importance_map(patch).numpy() if blend == "gaussian" else None
    expected = original_sliding_window(window_mean_and_square, image.numpy(), patch, stride, weight)
    out = predict_sliding_window(window_mean_and_square, image[None], patch, stride, blend=blend)
    assert out.shape == (2, *shape)
    torch.testing.assert_close(out, torch.from_numpy(expected))


def test_batch_size_does_not_change_the_output():
    image = torch.rand(1, 19, 13, 22, generator=torch.Generator().manual_seed(2))
    one = predict_sliding_window(window_mean_and_square, image, (8, 8, 8), (3, 4, 5), batch_size=1)
    three = predict_sliding_window(window_mean_and_square, image, (8, 8, 8), (3, 4, 5), batch_size=3)
    assert torch.equal(one, three)


def test_stride_tuple_is_applied_per_axis():
    grid = torch.stack(torch.meshgrid(*[torch.arange(40.0)] * 3, indexing="ij"))  # (3, D, H, W) coordinates
    seen = []

    def record(x):
        seen.extend(tuple(int(v) for v in window[:, 0, 0, 0]) for window in x)
        return x

    predict_sliding_window(record, grid, patch=(16, 16, 16), stride=(8, 12, 16), batch_size=4)
    expected = set(itertools.product([0, 8, 16, 24], [0, 12, 24], [0, 16, 24]))
    assert len(seen) == len(expected) and set(seen) == expected


def test_tta_flip_with_an_equivariant_predictor_reproduces_it():
    image = torch.rand(1, 21, 18, 9, generator=torch.Generator().manual_seed(3))
    out = predict_sliding_window(lambda x: 2 * x - 1, image, (8, 8, 8), (4, 4, 4), tta_flip=True)
    torch.testing.assert_close(out, 2 * image - 1)


def test_tta_flip_averages_the_eight_mirrorings():
    image = torch.rand(1, 8, 8, 8, generator=torch.Generator().manual_seed(4))

    def not_equivariant(x):
        return torch.cumsum(torch.cumsum(x, dim=2), dim=4)

    expected = torch.zeros(1, 8, 8, 8)
    for axes in [a for r in range(4) for a in itertools.combinations((1, 2, 3), r)]:
        flipped = torch.flip(image, axes) if axes else image
        out = not_equivariant(flipped[None])[0]
        expected += (torch.flip(out, axes) if axes else out) / 8
    out = predict_sliding_window(not_equivariant, image, 8, 8, tta_flip=True)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, not_equivariant(image[None])[0])


def test_output_stays_on_the_image_device_and_in_float32():
    image = torch.rand(1, 10, 10, 10, dtype=torch.float64)
    out = predict_sliding_window(lambda x: x.half(), image, 8, 4)
    assert out.dtype == torch.float32 and out.device == image.device


@requires_cuda
def test_cuda_image_is_predicted_and_accumulated_on_cuda():
    image = torch.rand(1, 70, 33, 40, device="cuda")
    out = predict_sliding_window(lambda x: x + 1, image, 32, 16, blend="gaussian", batch_size=2)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out, image + 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stride": (9, 8, 8)}, "must not exceed patch"),
        ({"blend": "cosine"}, "blend"),
        ({"batch_size": 0}, "batch_size"),
        ({"patch": (8, 8)}, "patch"),
        ({"stride": (0, 4, 4)}, "stride"),
    ],
)
def test_ill_options_raise_value_error(kwargs, message):
    args = {"patch": (8, 8, 8), "stride": (4, 4, 4)} | kwargs
    with pytest.raises(ValueError, match=message):
        predict_sliding_window(lambda x: x, torch.rand(1, 10, 10, 10), **args)


def test_ill_shapes_raise_value_error():
    with pytest.raises(ValueError, match=r"\(C, D, H, W\)"):
        predict_sliding_window(lambda x: x, torch.rand(10, 10, 10), 8, 4)
    with pytest.raises(ValueError, match="predict must map"):
        predict_sliding_window(lambda x: x[:, :, :4], torch.rand(1, 10, 10, 10), 8, 4)


# --- network wrappers ---------------------------------------------------------------------------------------------


class PointwiseDualNet(nn.Module):
    """A 1x1x1-conv 'network' returning ``(tanh(z), z)`` like unet_3D_dt, with optional dropout and BatchNorm."""

    def __init__(self, dropout: float = 0.0, batchnorm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 3, kernel_size=1)
        self.norm = nn.BatchNorm3d(3) if batchnorm else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.dropout(self.norm(self.conv(x)))
        return torch.tanh(z), z


def test_probabilities_are_the_softmax_of_the_last_output():
    net = PointwiseDualNet()
    image = np.random.default_rng(0).standard_normal((20, 30, 17)).astype(np.float32)
    probabilities, uncertainty = sliding_window_probabilities(net, image, patch=16, stride_xy=8, stride_z=4)
    with torch.no_grad():
        expected = torch.softmax(net.conv(torch.from_numpy(image)[None, None]), dim=1)[0]
    assert uncertainty is None
    torch.testing.assert_close(probabilities, expected)


def test_wrapper_stride_is_xy_on_the_first_two_axes_and_z_on_the_last():
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            # the image encodes each voxel's position as d * 10000 + h * 100 + w
            seen.extend(int(v) for v in x[:, 0, 0, 0, 0])
            return torch.zeros(x.shape[0], 2, *x.shape[2:])

    d, h, w = np.meshgrid(np.arange(40), np.arange(40), np.arange(40), indexing="ij")
    image = (d * 10000 + h * 100 + w).astype(np.float32)
    sliding_window_probabilities(Recorder(), image, patch=16, stride_xy=8, stride_z=12)
    starts = {(v // 10000, v // 100 % 100, v % 100) for v in seen}
    assert starts == set(itertools.product([0, 8, 16, 24], [0, 8, 16, 24], [0, 12, 24]))


def test_predict_volume_labels_is_the_uint8_argmax():
    net = PointwiseDualNet()
    image = np.random.default_rng(1).standard_normal((12, 9, 20)).astype(np.float32)
    labels = predict_volume_labels(net, image, patch=8, stride_xy=4, stride_z=4)
    with torch.no_grad():
        expected = net.conv(torch.from_numpy(image)[None, None])[0].argmax(0).numpy()
    assert labels.dtype == np.uint8 and labels.shape == image.shape
    np.testing.assert_array_equal(labels, expected)


def test_mc_dropout_returns_the_entropy_of_the_mean_softmax_and_restores_modes():
    net = PointwiseDualNet(dropout=0.5, batchnorm=True)
    net.train()
    net.norm.eval()  # a mixed state that must come back as it was
    running_mean = net.norm.running_mean.clone()
    image = torch.randn(1, 10, 12, 8)
    torch.manual_seed(5)
    probabilities, uncertainty = sliding_window_probabilities(net, image, 8, 4, 4, mc_passes=4)
    assert uncertainty is not None and uncertainty.shape == (10, 12, 8)
    torch.testing.assert_close(uncertainty, -(probabilities * torch.log(probabilities + 1e-6)).sum(0))
    assert float(uncertainty.max()) <= math.log(3) + 1e-5
    # dropout was on (4 passes disagree somewhere), BatchNorm stayed in eval mode (running stats untouched)
    deterministic, _ = sliding_window_probabilities(net, image, 8, 4, 4)
    assert not torch.allclose(probabilities, deterministic)
    torch.testing.assert_close(net.norm.running_mean, running_mean)
    assert net.training and net.dropout.training and not net.norm.training


def test_mc_dropout_of_a_network_without_dropout_has_zero_spread():
    net = PointwiseDualNet()
    image = torch.randn(1, 10, 12, 8)
    mc, uncertainty = sliding_window_probabilities(net, image, 8, 4, 4, mc_passes=3)
    deterministic, _ = sliding_window_probabilities(net, image, 8, 4, 4)
    torch.testing.assert_close(mc, deterministic)
    assert uncertainty is not None and bool((uncertainty > 0).all())  # entropy of a non-one-hot softmax


def test_amp_on_cpu_runs_in_bfloat16_and_returns_float32():
    net = PointwiseDualNet()
    dtypes = []
    net.conv.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    image = torch.randn(1, 10, 12, 8)
    probabilities, _ = sliding_window_probabilities(net, image, 8, 4, 4, amp=True)
    reference, _ = sliding_window_probabilities(net, image, 8, 4, 4, amp=False)
    assert dtypes[0] == torch.bfloat16 and dtypes[-1] == torch.float32
    assert probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities, reference, atol=0.02, rtol=0)


def test_wrapper_rejects_bad_mc_passes_and_image_rank():
    net = PointwiseDualNet()
    with pytest.raises(ValueError, match="mc_passes"):
        sliding_window_probabilities(net, torch.randn(8, 8, 8), 8, 4, 4, mc_passes=-1)
    with pytest.raises(ValueError, match="image must be"):
        sliding_window_probabilities(net, torch.randn(8, 8), 8, 4, 4)


# --- golden labels of the original code ---------------------------------------------------------------------------


def golden_unet_3d_dt(golden_dir):
    unet_3d = pytest.importorskip("networks.unet_3D", reason="networks/unet_3D.py not importable yet")
    golden = torch.load(golden_dir / "unet_3D_dt_golden.pt", weights_only=True)
    net = unet_3d.unet_3D_dt(n_classes=2, in_channels=1)
    net.load_state_dict(golden["state_dict"], strict=True)
    return net, golden


def test_unet_3d_dt_probabilities_equal_the_original_algorithm_on_a_small_volume(golden_dir):
    net, golden = golden_unet_3d_dt(golden_dir)
    volume = golden["sw_volume"][:12, 30:54, 20:60].numpy()  # padded on axis 0, two windows on axes 1 and 2

    def softmax_of_seg(x):
        with torch.no_grad():
            return torch.softmax(net(x)[1], dim=1)

    net.eval()
    expected = original_sliding_window(softmax_of_seg, volume, (16, 16, 32), (8, 8, 12))
    probabilities, _ = sliding_window_probabilities(net, volume, (16, 16, 32), stride_xy=8, stride_z=12)
    torch.testing.assert_close(probabilities, torch.from_numpy(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # 7-17 s on 2 shared CPU cores (18 windows of 64^3 through the 5.9M-parameter network)
def test_golden_unet_3d_dt_labels_agree_with_the_original(golden_dir):
    net, golden = golden_unet_3d_dt(golden_dir)
    labels = predict_volume_labels(
        net, golden["sw_volume"].numpy(), golden["sw_patch"], golden["sw_stride_xy"], golden["sw_stride_z"]
    )
    expected = golden["sw_labels"].numpy()
    assert labels.shape == expected.shape == (70, 100, 90)
    agreement = float((labels == expected).mean())
    assert agreement >= 0.9999, f"{(labels != expected).sum()} voxels differ"
