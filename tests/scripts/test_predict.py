"""Tests of code/predict.py: raw FLAIR scans in any orientation -> segmentation in the scan's own grid and affine."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import mounted_tmpfs
from torch import nn

from dataloaders.preprocess import crop_to_nonzero, normalise_intensity
from engine.prediction import SlidingWindow
from networks.net_factory_3d import net_factory_3d
from predict import find_flair, main, segment_volume

SHAPE = (44, 40, 30)  # x, y, z of the LPS-oriented scan
LPS_AFFINE = np.array([[-1.0, 0, 0, 30.0], [0, -1.0, 0, 200.0], [0, 0, 1.0, -12.0], [0, 0, 0, 1]])
FAST = {"window": SlidingWindow((32, 32, 32), 16, 16)}
FAST_ARGS = ["--patch_size", "32", "32", "32", "--stride_xy", "16", "--stride_z", "16", "--feature_scale", "8"]
FAST_ARGS += ["--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def flair_volume(seed: int = 0) -> np.ndarray:
    """A skull-stripped FLAIR-like volume: off-centre ellipsoid brain with an intensity ramp and a bright blob."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    brain = ((x - 24) / 15) ** 2 + ((y - 18) / 14) ** 2 + ((z - 14) / 11) ** 2 <= 1
    blob = (x - 27) ** 2 + (y - 20) ** 2 + (z - 15) ** 2 <= 20
    rng = np.random.default_rng(seed)
    values = 200 + 4 * x + 2 * y + 250 * blob + rng.normal(0, 10, SHAPE)
    return np.where(brain, values, 0).astype(np.float32)


def to_ras_transposed(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same scan stored differently: new[a, b, c] = old[X-1-b, Y-1-c, a], with the matching affine.

    old index p = M q + o with q = (a, b, c): p0 = X-1-b, p1 = Y-1-c, p2 = a.
    """
    new = np.transpose(np.flip(volume, axis=(0, 1)), (2, 0, 1))
    to_old = np.array(
        [[0, -1, 0, volume.shape[0] - 1], [0, 0, -1, volume.shape[1] - 1], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float
    )
    return np.ascontiguousarray(new), affine @ to_old


def back_to_lps(new: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_ras_transposed` on the arrays."""
    return np.flip(np.transpose(new, (1, 2, 0)), axis=(0, 1))


class Threshold(nn.Module):
    """A pointwise stand-in network: tumour where the normalised input exceeds ``level``; returns (tanh(z), z)."""

    def __init__(self, level: float) -> None:
        super().__init__()
        self.level = level

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([torch.zeros_like(x), 10 * (x - self.level)], dim=1)
        return torch.tanh(z), z


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return net_factory_3d("unet_3D_dt", in_chns=1, class_num=2, feature_scale=8).eval()


def test_input_volume_is_not_lps_in_the_orientation_test():
    _, affine = to_ras_transposed(flair_volume(), LPS_AFFINE)
    assert nib.aff2axcodes(LPS_AFFINE) == ("L", "P", "S")
    assert nib.aff2axcodes(affine) != ("L", "P", "S")


@pytest.mark.parametrize("orientation", ["lps", "ras_transposed"])
def test_pointwise_network_gives_the_threshold_of_the_normalised_scan_in_the_input_grid(orientation):
    volume = flair_volume()
    affine = LPS_AFFINE
    if orientation == "ras_transposed":
        volume, affine = to_ras_transposed(volume, affine)
    # expectation from the preprocessing definition alone: crop to nonzero, clip + z-score, threshold, paste back
    cropped, bbox = crop_to_nonzero(volume)
    expected = np.zeros(volume.shape, dtype=np.uint8)
    expected[tuple(slice(a, b) for a, b in bbox)] = normalise_intensity(cropped) > 0.5
    result = segment_volume(Threshold(0.5), volume, affine, **FAST)
    assert result.labels.shape == volume.shape and result.labels.dtype == np.uint8
    np.testing.assert_array_equal(result.labels, expected)
    assert 0 < expected.sum() < (volume > 0).sum()  # a real split, not all or nothing


def test_same_scan_in_two_orientations_gives_the_same_segmentation():
    net = tiny_net()
    volume = flair_volume()
    ras, ras_affine = to_ras_transposed(volume, LPS_AFFINE)
    lps_labels = segment_volume(net, volume, LPS_AFFINE, **FAST).labels
    ras_labels = segment_volume(net, ras, ras_affine, **FAST).labels
    assert ras_labels.shape == ras.shape
    np.testing.assert_array_equal(back_to_lps(ras_labels), lps_labels)


def test_coarse_scan_is_resampled_to_1mm_and_mapped_back():
    volume = flair_volume()
    coarse = volume[:, :, ::2]  # 2 mm slices
    affine = LPS_AFFINE @ np.diag([1.0, 1.0, 2.0, 1.0])
    ras, ras_affine = to_ras_transposed(coarse, affine)  # the 2 mm axis becomes the first axis
    seen: list[tuple[int, ...]] = []

    class Recording(Threshold):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            seen.append(tuple(x.shape))
            return super().forward(x)

    labels = segment_volume(Recording(0.5), ras, ras_affine, window=SlidingWindow((8, 8, 8), 8, 8))
    assert labels.labels.shape == ras.shape
    native = segment_volume(Threshold(0.5), ras, ras_affine, spacing=None, **FAST).labels
    assert np.mean(labels.labels == native) > 0.97  # same threshold, up to interpolation at the edges
    # windows of 8 over the resampled grid (the 1 mm grid has twice the slices of the 2 mm one along z)
    cropped, _ = crop_to_nonzero(coarse)
    windows_1mm = np.prod([-(-n // 8) for n in (cropped.shape[0], cropped.shape[1], 2 * cropped.shape[2])])
    assert len(seen) == windows_1mm


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "net.pth"
    torch.save(tiny_net().state_dict(), path)
    return path


def test_cli_writes_uint8_segmentation_and_uncertainty_with_the_input_affine(tmp_path, checkpoint):
    ras, ras_affine = to_ras_transposed(flair_volume(), LPS_AFFINE)
    source = nib.Nifti1Image(ras.astype(np.int16), ras_affine)
    source.header.set_qform(ras_affine, code=1)
    source.header.set_sform(ras_affine, code=2)
    nib.save(source, tmp_path / "scan.nii.gz")
    out, unc = tmp_path / "out" / "seg.nii.gz", tmp_path / "out" / "unc.nii.gz"
    code = main(
        ["--input", str(tmp_path / "scan.nii.gz"), "--output", str(out), "--checkpoint", str(checkpoint)]
        + ["--uncertainty", str(unc), "--mc_passes", "2", *FAST_ARGS]
    )
    assert code == 0
    seg_img, unc_img = nib.load(out), nib.load(unc)
    for img, dtype in ((seg_img, np.uint8), (unc_img, np.float32)):
        assert img.shape == ras.shape
        assert img.get_data_dtype() == dtype
        np.testing.assert_allclose(img.affine, ras_affine, atol=1e-6)
        assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (1, 2)
    assert set(np.unique(np.asarray(seg_img.dataobj))) <= {0, 1}
    uncertainty = np.asarray(unc_img.dataobj)
    assert uncertainty.min() >= 0 and uncertainty.max() <= np.log(2) + 1e-6
    assert uncertainty.max() > 0


@pytest.mark.parametrize(("flag", "enabled"), [([], True), (["--keep_freed_memory", "0"], False)])
def test_cli_keeps_freed_memory_by_default_on_cpu(tmp_path, checkpoint, monkeypatch, flag, enabled):
    import contextlib

    import speed

    calls = []

    @contextlib.contextmanager
    def recorder():
        calls.append("kept")
        yield True

    monkeypatch.setattr(speed, "keeping_freed_memory", recorder)
    nib.save(nib.Nifti1Image(flair_volume(), LPS_AFFINE), tmp_path / "scan.nii.gz")
    out = tmp_path / "seg.nii.gz"
    assert main(["--input", str(tmp_path / "scan.nii.gz"), "--output", str(out), "--checkpoint", str(checkpoint),
                 *FAST_ARGS, *flag]) == 0
    assert calls == (["kept"] if enabled else [])  # around the one scan's prediction


def test_cli_uses_the_flair_of_a_brats_case_folder(tmp_path, checkpoint):
    case = tmp_path / "BraTS19_NEW_1"
    case.mkdir()
    volume = flair_volume()
    nib.save(nib.Nifti1Image(volume, LPS_AFFINE), case / "BraTS19_NEW_1_flair.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), LPS_AFFINE), case / "BraTS19_NEW_1_t1.nii.gz")
    assert find_flair(case).name == "BraTS19_NEW_1_flair.nii.gz"
    out = tmp_path / "seg.nii.gz"
    assert main(["--input", str(case), "--output", str(out), "--checkpoint", str(checkpoint), *FAST_ARGS]) == 0
    assert nib.load(out).shape == SHAPE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BraTS19_NEW_1", "seg.nii.gz"]  # no temporary file left


@pytest.mark.parametrize("problem", ["missing", "no_flair", "unreadable", "pretrained_missing"])
def test_cli_errors_are_one_line_and_exit_1(tmp_path, checkpoint, capsys, problem):
    weights = ["--checkpoint", str(checkpoint)]
    if problem == "missing":
        source, expected = tmp_path / "nope.nii.gz", "does not exist"
    elif problem == "no_flair":
        source = tmp_path / "case"
        source.mkdir()
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), source / "case_t1.nii.gz")
        expected = "no FLAIR"
    elif problem == "unreadable":
        source = tmp_path / "broken_flair.nii.gz"
        source.write_bytes(b"\x1f\x8b not really gzip")
        expected = "cannot read"
    else:
        source = tmp_path / "flair.nii.gz"
        nib.save(nib.Nifti1Image(flair_volume(), LPS_AFFINE), source)
        weights = ["--pretrained", "25", "--model_dir", str(tmp_path / "models")]
        expected = "download_pretrained.py --labeled_num 25"
    out = tmp_path / "seg.nii.gz"
    code = main(["--input", str(source), "--output", str(out), *weights, *FAST_ARGS])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert expected in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_fast_network_gives_the_plain_segmentation(tmp_path, checkpoint):
    nib.save(nib.Nifti1Image(flair_volume(), LPS_AFFINE), tmp_path / "scan.nii.gz")
    segs = []
    for extra in ([], ["--fast"]):
        out = tmp_path / f"seg{len(extra)}.nii.gz"
        assert main(["--input", str(tmp_path / "scan.nii.gz"), "--output", str(out), "--checkpoint", str(checkpoint)]
                    + FAST_ARGS + extra) == 0
        segs.append(np.asarray(nib.load(out).dataobj))
    assert segs[0].any()
    assert (segs[0] != segs[1]).mean() < 1e-4  # same probabilities up to float rounding: only near-ties may flip


@contextlib.contextmanager
def unwritable_folder(tmp_path: Path, how: str):
    folder = tmp_path / "read_only"
    if how == "mount":
        with mounted_tmpfs(folder, read_only=True):
            yield folder
        return
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("permission bits do not stop this user (root)")
        yield folder
    finally:
        folder.chmod(0o755)


@pytest.fixture
def no_prediction(monkeypatch):
    """Make predicting fail loudly: the checks under test must stop the run before it."""
    import predict

    def must_not_run(*args, **kwargs):
        raise AssertionError("predicted although the output cannot be written")

    monkeypatch.setattr(predict, "segment_volume", must_not_run)


@pytest.mark.parametrize("how", ["chmod", "mount"])
@pytest.mark.parametrize("which", ["output", "uncertainty"])
def test_an_unwritable_output_is_one_line_before_predicting(tmp_path, checkpoint, capsys, no_prediction, how, which):
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(flair_volume(), LPS_AFFINE), scan)
    with unwritable_folder(tmp_path, how) as folder:
        out, unc = tmp_path / "seg.nii.gz", tmp_path / "unc.nii.gz"
        if which == "output":
            out = folder / "sub" / "seg.nii.gz"
        else:
            unc = folder / "unc.nii.gz"
        code = main(["--input", str(scan), "--output", str(out), "--uncertainty", str(unc)]
                    + ["--checkpoint", str(checkpoint), *FAST_ARGS])
        err = capsys.readouterr().err.strip()
        assert code == 1
        [line] = err.splitlines()
        bad = out if which == "output" else unc
        assert line.startswith(f"error: cannot write output file {bad}: folder {folder} is not writable")
        assert not out.exists() and not unc.exists()


def test_an_output_onto_the_input_scan_is_refused(tmp_path, checkpoint, capsys, no_prediction):
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(flair_volume(), LPS_AFFINE), scan)
    before = scan.read_bytes()
    code = main(["--input", str(scan), "--output", str(tmp_path / "." / "scan.nii.gz")]
                + ["--checkpoint", str(checkpoint), *FAST_ARGS])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "is the input scan" in line and "overwritten" in line
    assert scan.read_bytes() == before


def test_the_same_path_for_output_and_uncertainty_is_refused(tmp_path, checkpoint, capsys, no_prediction):
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(flair_volume(), LPS_AFFINE), scan)
    out = tmp_path / "seg.nii.gz"
    code = main(["--input", str(scan), "--output", str(out), "--uncertainty", str(out)]
                + ["--checkpoint", str(checkpoint), *FAST_ARGS])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and f"--uncertainty and --output are the same file {out}" in line
    assert not out.exists()


def test_a_full_disk_at_the_end_is_one_line_naming_the_output(tmp_path, checkpoint, capsys):
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(flair_volume(), LPS_AFFINE), scan)
    with mounted_tmpfs(tmp_path / "disk", size="4k") as disk:
        (disk / "filler").write_bytes(b"\0" * 4096)  # the disk is full, creating an empty file still works
        out = disk / "seg.nii.gz"
        code = main(["--input", str(scan), "--output", str(out), "--checkpoint", str(checkpoint), *FAST_ARGS])
        [line] = capsys.readouterr().err.strip().splitlines()
        assert code == 1
        assert line == f"error: [Errno 28] No space left on device: '{out}'"
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]


# ------------------------------------------------------------------------------------------------ modalities


def t2_volume(seed: int = 1) -> np.ndarray:
    """A second modality of :func:`flair_volume`'s scan: a larger brain (so the crop box is the union of both) and
    a bright blob elsewhere (so a network reading this channel segments something else)."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    brain = ((x - 22) / 18) ** 2 + ((y - 19) / 16) ** 2 + ((z - 15) / 13) ** 2 <= 1
    blob = (x - 15) ** 2 + (y - 14) ** 2 + (z - 12) ** 2 <= 16
    rng = np.random.default_rng(seed)
    values = 500 - 3 * y + 2 * z + 400 * blob + rng.normal(0, 10, SHAPE)
    return np.where(brain, values, 0).astype(np.float32)


class ChannelThreshold(Threshold):
    """:class:`Threshold` of input channel ``channel`` (the network has several)."""

    def __init__(self, level: float, channel: int) -> None:
        super().__init__(level)
        self.channel = channel

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(x[:, self.channel : self.channel + 1])


def expected_threshold(volumes: list[np.ndarray], channel: int, level: float) -> np.ndarray:
    """From the preprocessing definition: crop to the voxels nonzero in any modality, normalise, threshold."""
    _, bbox = crop_to_nonzero(np.stack(volumes))
    box = tuple(slice(a, b) for a, b in bbox)
    expected = np.zeros(volumes[0].shape, dtype=np.uint8)
    expected[box] = normalise_intensity(volumes[channel][box]) > level
    return expected


def save_scan(path: Path, volume: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(volume, affine), path)
    return path


@pytest.fixture
def stub_network(monkeypatch):
    """Make ``predict.main`` build a :class:`ChannelThreshold` reading channel 1 and record its input channels."""
    import predict

    built: list[int] = []

    def factory(name, in_chns, class_num, **kwargs):
        built.append(in_chns)
        return ChannelThreshold(0.5, channel=1)

    monkeypatch.setattr(predict, "net_factory_3d", factory)
    monkeypatch.setattr(predict, "load_weights", lambda net, path, map_location=None: None)
    return built


@pytest.mark.parametrize("given", ["case_folder", "files_in_order"])
def test_two_modalities_give_the_threshold_of_channel_1_in_the_input_grid(tmp_path, stub_network, given):
    flair, t2 = to_ras_transposed(flair_volume(), LPS_AFFINE)[0], to_ras_transposed(t2_volume(), LPS_AFFINE)[0]
    _, affine = to_ras_transposed(flair_volume(), LPS_AFFINE)
    case = tmp_path / "BraTS19_NEW_2"
    case.mkdir()
    paths = {m: save_scan(case / f"BraTS19_NEW_2_{m}.nii.gz", v, affine) for m, v in (("flair", flair), ("t2", t2))}
    save_scan(case / "BraTS19_NEW_2_t1.nii.gz", np.zeros_like(flair), affine)  # not asked for: never read
    if given == "case_folder":  # --modalities flair t2: channel 1 is T2
        inputs, modalities, expected = [str(case)], ["flair", "t2"], expected_threshold([flair, t2], 1, 0.5)
    else:  # files in the order of --modalities t2 flair: channel 1 is FLAIR
        inputs, modalities = [str(paths["t2"]), str(paths["flair"])], ["t2", "flair"]
        expected = expected_threshold([t2, flair], 1, 0.5)
    out = tmp_path / "seg.nii.gz"
    assert main(["--input", *inputs, "--modalities", *modalities, "--output", str(out), "--checkpoint", "unused.pth",
                 *FAST_ARGS]) == 0
    assert stub_network == [2]  # the network's input channels follow --modalities
    seg = nib.load(out)
    assert seg.shape == flair.shape
    np.testing.assert_allclose(seg.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(seg.dataobj), expected)
    assert 0 < expected.sum() < 0.5 * (t2 > 0).sum()
    channel_0 = expected_threshold([flair, t2], 0 if given == "case_folder" else 1, 0.5)
    assert (expected != channel_0).any()  # channel 1 is read, not channel 0
    if given == "files_in_order":  # FLAIR's own box lies inside T2's: the union box sets its normalisation
        assert (expected != expected_threshold([flair], 0, 0.5)).any()


def test_one_modality_of_a_4d_array_is_the_3d_segmentation():
    volume = flair_volume()
    three = segment_volume(Threshold(0.5), volume, LPS_AFFINE, **FAST).labels
    four = segment_volume(Threshold(0.5), volume[None], LPS_AFFINE, **FAST).labels
    np.testing.assert_array_equal(four, three)


@pytest.fixture(scope="module")
def checkpoint_2ch(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt2") / "net2.pth"
    torch.save(net_factory_3d("unet_3D_dt", in_chns=2, class_num=2, feature_scale=8).state_dict(), path)
    return path


def test_cli_two_modalities_with_a_two_channel_network(tmp_path, checkpoint_2ch):
    case = tmp_path / "case"
    case.mkdir()
    save_scan(case / "case_flair.nii.gz", flair_volume(), LPS_AFFINE)
    save_scan(case / "case_t1ce.nii.gz", t2_volume(), LPS_AFFINE)
    save_scan(case / "case_t1.nii.gz", np.zeros(SHAPE, np.float32), LPS_AFFINE)  # t1 must not take the t1ce file
    out, unc = tmp_path / "seg.nii.gz", tmp_path / "unc.nii.gz"
    assert main(["--input", str(case), "--modalities", "flair", "t1ce", "--output", str(out), "--uncertainty",
                 str(unc), "--mc_passes", "2", "--checkpoint", str(checkpoint_2ch), *FAST_ARGS]) == 0
    for path in (out, unc):
        assert nib.load(path).shape == SHAPE
        np.testing.assert_allclose(nib.load(path).affine, LPS_AFFINE)


@pytest.mark.parametrize(
    "problem", ["missing_modality", "shape", "affine", "count", "one_channel_checkpoint", "repeated"]
)
def test_modality_errors_are_one_line(tmp_path, checkpoint, checkpoint_2ch, capsys, problem):
    case = tmp_path / "BraTS19_NEW_3"
    case.mkdir()
    flair = save_scan(case / "BraTS19_NEW_3_flair.nii.gz", flair_volume(), LPS_AFFINE)
    t2 = case / "BraTS19_NEW_3_t2.nii.gz"
    inputs, modalities, weights = [str(flair), str(t2)], ["flair", "t2"], str(checkpoint_2ch)
    if problem == "missing_modality":
        save_scan(case / "BraTS19_NEW_3_t1ce.nii.gz", t2_volume(), LPS_AFFINE)
        inputs, expected = [str(case)], [f"no t2 NIfTI (*_t2.nii.gz) in folder {case}"]
    elif problem == "shape":
        save_scan(t2, t2_volume()[:, :, :-2], LPS_AFFINE)
        expected = [f"{t2} has shape (44, 40, 28) but {flair} has shape (44, 40, 30)"]
    elif problem == "affine":
        save_scan(t2, t2_volume(), LPS_AFFINE @ np.diag([1.0, 1.0, 2.0, 1.0]))
        expected = [f"{t2} and {flair} have different affines"]
    elif problem == "count":
        save_scan(t2, t2_volume(), LPS_AFFINE)
        modalities, expected = ["flair"], ["2 input files for 1 modalities (flair)"]
    elif problem == "one_channel_checkpoint":
        save_scan(t2, t2_volume(), LPS_AFFINE)
        weights, expected = str(checkpoint), [f"weights in {checkpoint} do not fit",
                                              "(the network has 2 input channels: --modalities flair t2)"]
    else:
        save_scan(t2, t2_volume(), LPS_AFFINE)
        inputs, modalities, expected = [str(case)], ["t2", "t2"], ["--modalities must not repeat"]
    out = tmp_path / "seg.nii.gz"
    with contextlib.suppress(SystemExit):  # argparse's exit 2 for a repeated modality
        code = main(["--input", *inputs, "--modalities", *modalities, "--output", str(out), "--checkpoint", weights,
                     *FAST_ARGS])
    err = capsys.readouterr().err.strip()
    if problem == "repeated":
        assert expected[0] in err.splitlines()[-1]
        return
    assert code == 1
    [line] = err.splitlines()
    assert line.startswith("error: ") and all(e in line for e in expected), line
    assert not out.exists()
