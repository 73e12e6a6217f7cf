"""Tests of utils/visualize.py: PNG written with the promised pixel size, slice choice, errors."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from utils.visualize import largest_cross_section, save_overlay_png


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) read from the PNG signature and IHDR chunk (independent of matplotlib)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(20, 18, 16)).astype(np.float32)
    label = np.zeros((20, 18, 16), dtype=np.uint8)
    label[5:12, 4:10, 6:9] = 1
    pred = np.roll(label, 1, axis=0)
    unc = rng.uniform(0, 0.69, size=(20, 18, 16)).astype(np.float32)
    return image, label, pred, unc


def test_png_with_four_panels_has_the_promised_pixel_size(tmp_path):
    image, label, pred, unc = volumes()
    out = save_overlay_png(tmp_path / "sub" / "case.png", image, label, pred, unc, panel_inches=2.0, dpi=50)
    assert out.is_file() and out.stat().st_size > 1000
    assert png_size(out) == (4 * 2 * 50, 2 * 50)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["case.png"]  # no temporary file left


def test_png_without_uncertainty_has_three_panels(tmp_path):
    image, label, pred, _ = volumes()
    out = save_overlay_png(tmp_path / "case.png", image, label, pred, dpi=40)
    assert png_size(out) == (3 * 3 * 40, 3 * 40)


def test_largest_cross_section_picks_the_slice_with_most_tumour():
    mask = np.zeros((6, 6, 5), dtype=bool)
    mask[1:3, 1:3, 1] = True  # 4 voxels
    mask[0:4, 0:3, 3] = True  # 12 voxels
    assert largest_cross_section(mask, axis=2) == 3
    assert largest_cross_section(mask, axis=0) in (1, 2)  # rows 1 and 2 both hold 3 + 2 = 5 voxels
    assert largest_cross_section(mask, axis=0) == 1  # first on a tie
    assert largest_cross_section(np.zeros((3, 3, 3)), axis=1) is None


def test_empty_masks_fall_back_to_the_middle_slice(tmp_path):
    image, _, _, _ = volumes()
    empty = np.zeros(image.shape, dtype=np.uint8)
    out = save_overlay_png(tmp_path / "e.png", image, empty, empty, dpi=20)
    assert png_size(out) == (3 * 3 * 20, 3 * 20)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"axis": 3}, "axis must be 0, 1 or 2"),
        ({"index": 16}, "outside the volume"),
        ({"pred": np.zeros((20, 18, 15))}, "pred has shape"),
    ],
)
def test_bad_arguments_raise_value_error(tmp_path, kwargs, message):
    image, label, pred, _ = volumes()
    args = {"image": image, "label": label, "pred": pred, **kwargs}
    with pytest.raises(ValueError, match=message):
        save_overlay_png(tmp_path / "x.png", **args)
    assert not list(tmp_path.iterdir())
