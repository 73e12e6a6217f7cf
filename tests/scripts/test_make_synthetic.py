from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from make_synthetic_brats import MODALITIES, brats_affine, case_name, main, make_case, write_case

CODE = Path(__file__).resolve().parents[2] / "code"
SHAPE = (40, 36, 28)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    assert main(["--out_dir", str(out), "--num_cases", "2", "--shape", *map(str, SHAPE), "--seed", "5"]) == 0
    return out


def load(out, name, key):
    return nib.load(out / name / f"{name}_{key}.nii.gz")


def test_cli_writes_the_brats_layout(written):
    for name in ("BraTS19_SYN_0001_1", "BraTS19_SYN_0002_1"):
        files = sorted(p.name for p in (written / name).iterdir())
        assert files == sorted(f"{name}_{k}.nii.gz" for k in (*MODALITIES, "seg"))


def test_images_are_int16_with_exact_zero_background_and_seg_uint8_labels(written):
    name = case_name(1)
    seg_img = load(written, name, "seg")
    seg = np.asarray(seg_img.dataobj)
    assert seg_img.get_data_dtype() == np.uint8 and seg.shape == SHAPE
    assert set(np.unique(seg)) <= {0, 1, 2, 4} and (seg > 0).any()
    brain = np.asarray(load(written, name, "flair").dataobj) > 0
    for key in MODALITIES:
        img = load(written, name, key)
        data = np.asarray(img.dataobj)
        assert img.get_data_dtype() == np.int16 and data.shape == SHAPE
        np.testing.assert_array_equal(data > 0, brain)  # one brain mask, zero outside in every modality
        assert data.min() == 0
    assert (brain[seg > 0]).all()
    assert 0.05 < brain.mean() < 0.4


def test_header_is_1mm_lps_like_the_release(written):
    img = load(written, case_name(2), "t1ce")
    expected = np.array([[-1, 0, 0, 0], [0, -1, 0, SHAPE[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    np.testing.assert_array_equal(img.affine, expected)
    np.testing.assert_array_equal(img.header.get_zooms(), (1.0, 1.0, 1.0))
    assert int(img.header["qform_code"]) == 2 and int(img.header["sform_code"]) == 1
    assert img.header.get_xyzt_units()[0] == "mm"
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")


def test_affine_and_codes_match_a_real_release_file(real_data_dir):
    real = nib.load(real_data_dir / "Brats18_2013_11_1" / "Brats18_2013_11_1_flair.nii.gz")
    np.testing.assert_array_equal(brats_affine(real.shape), real.affine)


def test_whole_tumour_is_brighter_on_flair_but_not_perfectly_separable():
    arrays = make_case((48, 48, 40), np.random.default_rng([0, 1]), grade="HGG")
    seg, flair = arrays["seg"], arrays["flair"].astype(np.float64)
    assert set(np.unique(seg)) == {0, 1, 2, 4}
    tumour, healthy = seg > 0, (flair > 0) & (seg == 0)
    assert flair[tumour].mean() > 1.3 * flair[healthy].mean()
    # the best global FLAIR threshold must not reproduce the label (brute force over all thresholds)
    best = max(
        2 * (tumour & (flair > t)).sum() / (tumour.sum() + (flair > t).sum()) for t in np.unique(flair[flair > 0])[::5]
    )
    assert 0.5 < best < 0.97


def test_lgg_cases_have_no_enhancing_tumour():
    seg = make_case((32, 32, 24), np.random.default_rng(3), grade="LGG")["seg"]
    assert set(np.unique(seg)) == {0, 1, 2}


def test_same_seed_gives_identical_cases_and_another_seed_differs():
    a = make_case((32, 32, 24), np.random.default_rng([7, 1]))
    b = make_case((32, 32, 24), np.random.default_rng([7, 1]))
    c = make_case((32, 32, 24), np.random.default_rng([8, 1]))
    for key in (*MODALITIES, "seg"):
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["flair"], c["flair"])


def test_case_files_do_not_depend_on_num_cases(tmp_path, written):
    main(["--out_dir", str(tmp_path), "--num_cases", "1", "--shape", *map(str, SHAPE), "--seed", "5"])
    for key in ("flair", "seg"):
        np.testing.assert_array_equal(
            np.asarray(load(tmp_path, case_name(1), key).dataobj), np.asarray(load(written, case_name(1), key).dataobj)
        )


def test_write_case_leaves_no_temporary_files(tmp_path):
    write_case(tmp_path, "X", make_case((16, 16, 16), np.random.default_rng(0)))
    assert sorted(p.name for p in (tmp_path / "X").iterdir()) == sorted(f"X_{k}.nii.gz" for k in (*MODALITIES, "seg"))


def test_write_case_rejects_mismatched_volumes(tmp_path):
    arrays = make_case((16, 16, 16), np.random.default_rng(0))
    arrays["t2"] = arrays["t2"][:-1]
    with pytest.raises(ValueError, match="'t2' has shape"):
        write_case(tmp_path, "X", arrays)


@pytest.mark.parametrize("shape", [(8, 32, 32), (32, 32)])
def test_make_case_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="shape"):
        make_case(shape, np.random.default_rng(0))


def test_cli_rejects_zero_cases(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["--out_dir", str(tmp_path), "--num_cases", "0"])
    assert info.value.code == 2


def test_script_runs_from_the_command_line_with_exit_status_zero(tmp_path):
    cmd = [sys.executable, "make_synthetic_brats.py", "--out_dir", str(tmp_path), "--num_cases", "1", "--shape"]
    result = subprocess.run([*cmd, "20", "20", "16"], cwd=CODE, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / case_name(1) / f"{case_name(1)}_seg.nii.gz").is_file()


@pytest.mark.slow
def test_default_release_shape_case(tmp_path):
    arrays = make_case((240, 240, 155), np.random.default_rng(0))
    write_case(tmp_path, case_name(1), arrays)
    img = load(tmp_path, case_name(1), "flair")
    assert img.shape == (240, 240, 155)
    np.testing.assert_array_equal(img.affine, brats_affine((240, 240, 155)))
