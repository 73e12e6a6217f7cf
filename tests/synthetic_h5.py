"""Tiny pre-processed BraTS-like datasets for tests: ``<root>/data/<case>.h5`` plus split lists.

Import in a test as ``from synthetic_h5 import write_synthetic_h5_dataset`` (``tests/`` is on ``sys.path`` because
``tests/conftest.py`` lives there).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, List, Union

import h5py
import numpy as np

__all__ = ["synthetic_case_name", "write_synthetic_h5_dataset"]

PathLike = Union[str, "os.PathLike[str]"]


def synthetic_case_name(index: int) -> str:
    """``BraTS19_SYN_<index:04d>_1``, the naming of ``make_synthetic_brats.py`` (1-based)."""
    return f"BraTS19_SYN_{index:04d}_1"


def _case(shape: Sequence[int], rng: np.random.Generator, with_tumour: bool) -> tuple:
    """One ``(image float32, label uint8)`` pair: an ellipsoid brain, a bright blob tumour inside it, noise.

    The image is z-scored over the brain like the real pre-processing, so the background is a negative constant.
    """
    axes = [np.arange(n, dtype=np.float32) for n in shape]
    xx, yy, zz = np.meshgrid(*axes, indexing="ij")
    sides = np.asarray(shape, dtype=np.float32)
    centre = sides / 2 + rng.uniform(-0.05, 0.05, size=3) * sides
    semi = sides * rng.uniform(0.36, 0.46, size=3)
    brain = ((xx - centre[0]) / semi[0]) ** 2 + ((yy - centre[1]) / semi[1]) ** 2 + (
        (zz - centre[2]) / semi[2]
    ) ** 2 < 1
    label = np.zeros(tuple(shape), dtype=np.uint8)
    if with_tumour:
        radius = max(1.5, float(rng.uniform(0.12, 0.22)) * float(sides.min()))
        t_centre = centre + rng.uniform(-0.3, 0.3, size=3) * (semi - radius).clip(0)
        blob = (xx - t_centre[0]) ** 2 + (yy - t_centre[1]) ** 2 + (zz - t_centre[2]) ** 2 < radius**2
        label[blob & brain] = 1
    raw = np.where(brain, 1.0, 0.0) + 1.2 * label + rng.normal(0.0, 0.25, size=tuple(shape))
    raw = np.where(brain, raw.clip(0.05), 0.0)
    values = raw[brain]
    image = ((raw - values.mean()) / values.std()).astype(np.float32)
    return image, label


def write_synthetic_h5_dataset(
    root: PathLike,
    n_cases: int,
    shape: Sequence[int],
    seed: int,
    *,
    n_val: int | None = None,
    n_test: int | None = None,
    empty: Sequence[int] = (),
    channels: int = 1,
    classes: int = 2,
) -> List[str]:
    """Write ``n_cases`` cases as ``<root>/data/<case>.h5`` (``image`` float32, ``label`` uint8) and the split lists.

    Cases are numbered 1..n_cases; ``train.txt`` lists the first ``n_cases - n_val - n_test``, ``val.txt`` the next
    ``n_val`` and ``test.txt`` the last ``n_test``. By default ``n_val = n_test = max(1, n_cases // 5)``.

    Args:
        root: dataset folder (created).
        n_cases: number of cases, >= 3 with the default split.
        shape: ``(D, H, W)`` of every case.
        seed: everything is drawn from ``np.random.default_rng(seed)``.
        n_val: number of validation cases.
        n_test: number of test cases.
        empty: 0-based case positions written with an all-zero label (no tumour).
        channels: image channels; more than 1 writes (C, D, H, W) images, channel c = image * (1 + c / 4) + c.
        classes: label classes; more than 2 splits the tumour into shells, class 1 outermost.

    Returns:
        All case names, in order (train first, then val, then test).

    Raises:
        ValueError: if the split leaves no training case.
    """
    n_val = max(1, n_cases // 5) if n_val is None else n_val
    n_test = max(1, n_cases // 5) if n_test is None else n_test
    n_train = n_cases - n_val - n_test
    if n_train < 1 or n_val < 0 or n_test < 0:
        raise ValueError(f"n_cases={n_cases} with n_val={n_val}, n_test={n_test} leaves {n_train} training cases")
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [synthetic_case_name(i + 1) for i in range(n_cases)]
    for i, name in enumerate(names):
        image, label = _case(shape, rng, with_tumour=i not in set(empty))
        if channels > 1:
            image = np.stack([image * (1 + c / 4) + c for c in range(channels)]).astype(np.float32)
        if classes > 2 and label.any():
            from scipy import ndimage

            depth = ndimage.distance_transform_edt(label > 0)
            shells = np.ceil(depth / max(depth.max(), 1e-6) * (classes - 1)).clip(1, classes - 1)
            label = np.where(label > 0, shells, 0).astype(np.uint8)
        with h5py.File(root / "data" / f"{name}.h5", "w") as f:
            f.create_dataset("image", data=image)
            f.create_dataset("label", data=label)
    splits = {"train": names[:n_train], "val": names[n_train : n_train + n_val], "test": names[n_train + n_val :]}
    for split, members in splits.items():
        (root / f"{split}.txt").write_text("".join(f"{n}\n" for n in members), encoding="utf-8")
    return names


def tiny_config(root: PathLike, **overrides: Any) -> Any:
    """A CPU-sized ``TrainConfig`` on ``root`` (32^3 patches, U-Net / 16, T = 3, 4 iterations); ``fast_network``,
    ``keep_freed_memory`` and ``compile`` go into its ``speed`` options, everything else overrides a field."""
    from dataclasses import replace

    from engine.config import TrainConfig
    from speed import SpeedOptions

    options = {k: overrides.pop(k) for k in ("fast_network", "keep_freed_memory", "compile") if k in overrides}
    cfg = TrainConfig(
        root_path=str(root), exp="tiny", labeled_num=2, patch_size=(32, 32, 32), feature_scale=16,
        max_iterations=4, batch_size=2, labeled_bs=1, mc_passes=3, val_interval=2, save_interval=2,
        num_workers=0, device="cpu", stride_xy=16, stride_z=16, speed=SpeedOptions(**options),
    )
    return replace(cfg, **overrides)
