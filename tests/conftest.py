"""Shared fixtures. ``code/`` is on the path through ``pyproject.toml`` (pytest ``pythonpath``)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "design" / "golden"
REAL_DATA = SHARED / "data" / "brats2018_samples"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden values not found at {GOLDEN}")
    return GOLDEN


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real BraTS samples not found at {REAL_DATA}")
    return REAL_DATA
