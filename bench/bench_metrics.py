"""Time our HD95 / ASD / ASSD against medpy on a BraTS-sized synthetic case and check that they agree.

Run from the repository root::

    python bench/bench_metrics.py                      # 160 x 190 x 140 volume, ~50k-voxel tumour
    python bench/bench_metrics.py --shape 240 240 155 --repeats 5

The case is seeded: an irregular tumour (a few overlapping ellipsoids with a noisy boundary) and a prediction
made from it by moving its boundary, dropping a lobe and adding a few far-away false positives (a case where
cropping to the joint bounding box of both masks would not help). Prints a Markdown table
``metric | medpy s | ours s | speed-up | |diff|`` (median of the repeats) and exits with status 1 when a value
differs from medpy's by more than 1e-6.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

from utils.metrics import asd, assd, hd95  # noqa: E402

TOLERANCE = 1e-6


def make_case(shape: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(pred, gt)`` boolean volumes of ``shape``: a ~50k-voxel tumour and a perturbed prediction."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    grid = np.indices(shape, dtype=np.float32)
    centre = np.asarray(shape, dtype=np.float32) * rng.uniform(0.4, 0.6, size=3)

    def lobes(count: int, radius: float) -> np.ndarray:
        mask = np.zeros(shape, dtype=bool)
        for _ in range(count):
            c = centre + rng.normal(0.0, radius / 2, size=3)
            radii = radius * rng.uniform(0.6, 1.1, size=3)
            mask |= sum(((grid[a] - c[a]) / radii[a]) ** 2 for a in range(3)) <= 1.0
        return mask

    boundary_noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=3.0)
    core = lobes(count=5, radius=18.0)
    smooth_distance = ndimage.distance_transform_edt(~core) - ndimage.distance_transform_edt(core)
    gt = smooth_distance + 25.0 * boundary_noise < 0.0

    shifted_noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=2.0)
    pred = smooth_distance + 25.0 * boundary_noise + 15.0 * shifted_noise < 1.0
    dropped = sum(((grid[a] - (centre[a] + 12.0)) / 8.0) ** 2 for a in range(3)) <= 1.0
    pred &= ~dropped
    for corner in [(3, 3, 3), (shape[0] - 6, 8, shape[2] - 9), (10, shape[1] - 7, 5)]:
        pred[corner[0] : corner[0] + 3, corner[1] : corner[1] + 2, corner[2] : corner[2] + 3] = True
    pred[shape[0] - 1, shape[1] - 1, 0] = True  # a single voxel on the array border
    return pred, gt


def median_seconds(fn: Callable[[], float], repeats: int) -> tuple[float, float]:
    """Run ``fn`` ``repeats`` times; return (median wall time in s, its value)."""
    times, value = [], float("nan")
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 190, 140), help="volume size (D H W)")
    parser.add_argument("--spacing", type=float, nargs=3, default=None, help="voxel spacing; default 1 mm")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per metric and implementation")
    parser.add_argument("--seed", type=int, default=2019)
    args = parser.parse_args(argv)

    from medpy.metric import binary as medpy_binary

    pred, gt = make_case(args.shape, args.seed)
    spacing = None if args.spacing is None else tuple(args.spacing)
    print(
        f"case: volume {tuple(args.shape)}, gt {int(gt.sum())} voxels, pred {int(pred.sum())} voxels, "
        f"spacing {spacing or '1'}, median of {args.repeats} runs\n"
    )
    pairs = [
        ("hd95", lambda: medpy_binary.hd95(pred, gt, voxelspacing=spacing), lambda: hd95(pred, gt, spacing)),
        ("asd", lambda: medpy_binary.asd(pred, gt, voxelspacing=spacing), lambda: asd(pred, gt, spacing)),
        ("assd", lambda: medpy_binary.assd(pred, gt, voxelspacing=spacing), lambda: assd(pred, gt, spacing)),
    ]
    print("| metric | medpy s | ours s | speed-up | |diff| |")
    print("|---|---|---|---|---|")
    worst, values = 0.0, []
    for name, reference, ours in pairs:
        medpy_s, medpy_value = median_seconds(reference, args.repeats)
        ours_s, our_value = median_seconds(ours, args.repeats)
        diff = abs(float(medpy_value) - our_value)
        worst = max(worst, diff)
        values.append(f"{name} = {our_value:.4f}")
        print(f"| {name} | {medpy_s:.3f} | {ours_s:.4f} | {medpy_s / ours_s:.0f}x | {diff:.1e} |")
    print("\nvalues: " + ", ".join(values))
    if worst > TOLERANCE:
        print(f"\nFAIL: largest difference from medpy {worst:.3g} > {TOLERANCE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
