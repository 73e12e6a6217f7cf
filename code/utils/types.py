"""Named type aliases used across the package."""

from __future__ import annotations

from typing import Tuple

Shape3D = Tuple[int, int, int]
"""A 3-D size or patch, ``(D, H, W)`` in array order (x, y, z of the NIfTI volume)."""

__all__ = ["Shape3D"]
