"""Write synthetic cases in the raw BraTS2019 layout, for demos and tests without the real data.

    python make_synthetic_brats.py --out_dir ../data/BraTS2019_synthetic_raw --num_cases 20 [--shape 240 240 155]

Each case is ``<out_dir>/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` like the real release: int16 images with the
background exactly 0, labels {0, 1, 2, 4} (necrotic / non-enhancing core = 1, oedema = 2, enhancing tumour = 4),
1 mm voxels and the release's LPS affine ``diag(-1, -1, 1)`` with the y origin at ``H - 1``. Case names are
``BraTS19_SYN_0001_1`` ...

The anatomy is made so that segmenting the whole tumour on FLAIR is learnable but not trivial: a deformed ellipsoid
brain with CSF, grey-matter and white-matter classes (ventricles, a cortical band with sulci, deep grey matter), an
irregular tumour (necrotic core, enhancing rim, oedema whose FLAIR contrast fades towards its edge), a smooth bias
field, Rician noise and a few hot voxels (so the 99.9th-percentile clip of the pre-processing has work to do). Case
``i`` is drawn from ``np.random.default_rng([seed, i])``: the same seed gives the same files, whatever ``num_cases``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Dict, NamedTuple

import nibabel as nib
import numpy as np

from utils.atomic import atomic_path
from utils.types import Shape3D

__all__ = ["MODALITIES", "brats_affine", "case_name", "main", "make_case", "write_case"]

MODALITIES = ("flair", "t1", "t1ce", "t2")
MIN_SIDE = 16

# Tissue classes of the intensity model (not the labels written to seg).
_BG, _CSF, _GM, _WM, _NEC, _EDEMA, _ENH = range(7)
# Mean intensity per modality and class (background, CSF, GM, WM, necrosis, oedema, enhancing), in the range of
# the release's scanner units. On FLAIR, CSF is dark, GM a little brighter than WM, oedema clearly brighter.
_MEANS = {
    "flair": (0.0, 60.0, 230.0, 185.0, 300.0, 380.0, 340.0),
    "t1": (0.0, 120.0, 380.0, 500.0, 170.0, 330.0, 390.0),
    "t1ce": (0.0, 130.0, 420.0, 520.0, 190.0, 350.0, 950.0),
    "t2": (0.0, 1300.0, 620.0, 420.0, 1150.0, 950.0, 700.0),
}
# Seg label of each tumour class (necrotic / non-enhancing core 1, oedema 2, enhancing 4).
_SEG_OF = {_NEC: 1, _EDEMA: 2, _ENH: 4}


def case_name(index: int) -> str:
    """``BraTS19_SYN_<index:04d>_1`` (1-based index, as the release numbers its cases)."""
    return f"BraTS19_SYN_{index:04d}_1"


def brats_affine(shape: Sequence[int]) -> np.ndarray:
    """The release's voxel-to-world affine for an ``(X, Y, Z)`` volume: 1 mm, x and y flipped (LPS), y origin Y - 1."""
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[1, 3] = float(shape[1] - 1)
    return affine


def _check_shape(shape: Sequence[int]) -> Shape3D:
    items = list(shape)
    if len(items) != 3 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in items):
        raise ValueError(f"shape must be three ints (X, Y, Z), found {shape!r}")
    if min(items) < MIN_SIDE:
        raise ValueError(f"every side of shape must be at least {MIN_SIDE} voxels, found {tuple(items)}")
    return (int(items[0]), int(items[1]), int(items[2]))


def _grid(shape: Shape3D) -> tuple:
    """Broadcastable normalised coordinates in [0, 1] along each axis: (X,1,1), (1,Y,1), (1,1,Z) float32."""
    return tuple(
        np.linspace(0.0, 1.0, n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)])
        for i, n in enumerate(shape)
    )


def _smooth_field(grid: tuple, rng: np.random.Generator, low: float, high: float, n_waves: int = 6) -> np.ndarray:
    """Random smooth field with zero mean and unit variance: a sum of plane waves in random directions.

        f(x) = sqrt(2 / K) * sum_k cos(2 pi <nu_k, x> + phi_k),   |nu_k| ~ U(low, high) cycles per volume side

    Returns:
        ``(X, Y, Z)`` float32.
    """
    field = None
    for _ in range(n_waves):
        direction = rng.normal(size=3)
        freq = direction / max(float(np.linalg.norm(direction)), 1e-6) * rng.uniform(low, high) * (2.0 * math.pi)
        phase = np.float32(rng.uniform(0.0, 2.0 * math.pi))
        wave = np.cos(
            grid[0] * np.float32(freq[0]) + grid[1] * np.float32(freq[1]) + (grid[2] * np.float32(freq[2]) + phase)
        )
        field = wave if field is None else field + wave
    return field * np.float32(math.sqrt(2.0 / n_waves))


def make_case(shape: Sequence[int], rng: np.random.Generator, grade: str | None = None) -> Dict[str, np.ndarray]:
    """Draw one synthetic case.

    Args:
        shape: ``(X, Y, Z)`` volume size (the release's is 240 x 240 x 155), every side >= 16.
        rng: the source of all randomness.
        grade: ``'HGG'`` (necrotic core 1 inside an enhancing rim 4), ``'LGG'`` (non-enhancing core 1, no 4) or
            ``None`` (default) to draw HGG with probability 0.75.

    Returns:
        ``{'flair', 't1', 't1ce', 't2'}``: int16 ``(X, Y, Z)``, 0 outside the brain and >= 1 inside;
        ``'seg'``: uint8 ``(X, Y, Z)`` with labels in {0, 1, 2, 4}, all inside the brain.

    Raises:
        ValueError: for a bad ``shape`` or ``grade``.
    """
    shape3 = _check_shape(shape)
    if grade is None:
        grade = "HGG" if rng.random() < 0.75 else "LGG"
    if grade not in ("HGG", "LGG"):
        raise ValueError(f"grade must be 'HGG', 'LGG' or None, found {grade!r}")
    grid = _grid(shape3)
    # voxel coordinates, (X,1,1) (1,Y,1) (1,1,Z)
    vox = [g * np.float32(n - 1) for g, n in zip(grid, shape3)]
    brain = _draw_brain(grid, vox, shape3, rng)
    tissue = _draw_tissues(brain, grid, shape3, rng)
    underlying = tissue.copy()
    r_whole = _draw_tumour(tissue, brain, grid, vox, grade, rng)
    seg = np.zeros(shape3, dtype=np.uint8)
    for cls, value in _SEG_OF.items():
        seg[tissue == cls] = value

    # Oedema contrast fades towards its edge (to 30 % at the boundary): the label edge is not a sharp FLAIR edge.
    fade = rng.uniform(0.15, 0.4)
    edema_weight = 0.3 + 0.7 * np.clip((1.0 - r_whole) / np.float32(fade), 0.0, 1.0)
    texture = 1.0 + np.float32(0.05) * _smooth_field(grid, rng, 6.0, 14.0, 12)
    bias_fields = (_smooth_field(grid, rng, 0.2, 1.0, 4), _smooth_field(grid, rng, 0.2, 1.0, 4))
    edema = tissue == _EDEMA
    out: Dict[str, np.ndarray] = {}
    for mod in MODALITIES:
        means = np.asarray(_MEANS[mod]) * rng.uniform(0.8, 1.25) * rng.uniform(0.92, 1.08, size=7)
        means = means.astype(np.float32)
        image = means[tissue]
        image[edema] = means[underlying[edema]] + edema_weight[edema] * (means[_EDEMA] - means[underlying[edema]])
        out[mod] = _scanner_image(image, texture, bias_fields, float(means[_WM]), brain.mask, rng)
    out["seg"] = seg
    return out


class _Brain(NamedTuple):
    """The drawn brain ellipsoid: ``semi`` axes and ``centre`` in voxels, coordinates ``u`` relative to them,
    the ``mask`` and the ``depth`` (0 on the surface, 1 at the centre)."""

    semi: np.ndarray
    centre: np.ndarray
    u: list
    mask: np.ndarray
    depth: np.ndarray


def _draw_brain(grid: tuple, vox: list, shape: Shape3D, rng: np.random.Generator) -> _Brain:
    """Ellipsoid (proportions of the release's brains in 240 x 240 x 155) with a smooth random boundary."""
    semi = np.array([0.29, 0.355, 0.42]) * np.array(shape) * rng.uniform(0.92, 1.05, size=3)
    centre = np.array(shape) * (0.5 + rng.uniform(-0.03, 0.03, size=3))
    u = [(v - np.float32(c)) / np.float32(s) for v, c, s in zip(vox, centre, semi)]
    radius = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2)
    outline = 1.0 + np.float32(0.05) * _smooth_field(grid, rng, 0.5, 2.0)
    return _Brain(semi, centre, u, radius < outline, 1.0 - radius / outline)


def _draw_tissues(brain: _Brain, grid: tuple, shape: Shape3D, rng: np.random.Generator) -> np.ndarray:
    """White matter, a cortical grey band with CSF-filled sulci, deep grey nuclei, ventricles: (X, Y, Z) uint8."""
    u, depth = brain.u, brain.depth
    tissue = np.full(shape, _WM, dtype=np.uint8)
    cortex = depth < 0.12 + np.float32(0.04) * _smooth_field(grid, rng, 1.0, 4.0)
    tissue[cortex] = _GM
    sulci = cortex & (_smooth_field(grid, rng, 8.0, 16.0, 10) > 1.2)
    tissue[sulci] = _CSF
    tissue[depth < 0.02] = _CSF
    for side in (-1.0, 1.0):
        deep = ((u[0] - side * 0.28) / 0.12) ** 2 + ((u[1] + 0.05) / 0.2) ** 2 + (u[2] / 0.15) ** 2 < 1.0
        tissue[deep] = _GM
        vent_size = rng.uniform(0.8, 1.3)
        vent = ((u[0] - side * 0.1) / (0.06 * vent_size)) ** 2 + (u[1] / (0.32 * vent_size)) ** 2 + (
            (u[2] - 0.08) / (0.12 * vent_size)
        ) ** 2 < 1.0
        tissue[vent] = _CSF
    return tissue


def _draw_tumour(
    tissue: np.ndarray, brain: _Brain, grid: tuple, vox: list, grade: str, rng: np.random.Generator
) -> np.ndarray:
    """Paint an irregular sphere-like lesion into ``tissue`` (and the background outside the brain).

    Its centre lies well inside the brain, its radius is a fraction of the brain's; oedema around a core that is
    enhancing with a necrotic centre (HGG) or necrotic / non-enhancing (LGG).

    Returns:
        The normalised distance to the lesion centre over the oedema's deformed outline (< 1 inside), (X, Y, Z).
    """
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    t_centre = brain.centre + direction * rng.uniform(0.1, 0.45) * brain.semi
    t_radius = rng.uniform(0.25, 0.45) * float(brain.semi.mean())
    r_t = np.sqrt(sum((v - np.float32(c)) ** 2 for v, c in zip(vox, t_centre))) / np.float32(t_radius)
    r_whole = r_t / np.clip(1.0 + np.float32(0.22) * _smooth_field(grid, rng, 1.0, 3.5), 0.5, None)
    r_core = r_t / np.clip(1.0 + np.float32(0.25) * _smooth_field(grid, rng, 1.0, 4.0), 0.5, None)
    rho_core = rng.uniform(0.35, 0.6)
    rho_nec = rho_core * rng.uniform(0.3, 0.7)
    whole = brain.mask & (r_whole < 1.0)
    core = whole & (r_core < rho_core)
    tissue[whole] = _EDEMA
    if grade == "HGG":
        tissue[core] = _ENH
        tissue[core & (r_core < rho_nec)] = _NEC
    else:
        tissue[core] = _NEC
    tissue[~brain.mask] = _BG
    return r_whole


def _scanner_image(
    image: np.ndarray, texture: np.ndarray, bias_fields: tuple, wm_mean: float, brain: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Texture, a random mix of the bias fields, Rician noise and a few hot voxels on the tissue intensities
    ``image`` (changed in place); int16, 0 outside the brain and >= 1 inside."""
    a, b = rng.normal(size=2)
    strength = np.float32(rng.uniform(0.08, 0.18) / max(math.hypot(a, b), 1e-6))
    image *= texture * np.exp(strength * (np.float32(a) * bias_fields[0] + np.float32(b) * bias_fields[1]))
    # Rician noise: magnitude of a complex signal with Gaussian noise on both channels
    sigma = np.float32(rng.uniform(0.03, 0.07) * wm_mean)
    n1 = rng.standard_normal(image.shape, dtype=np.float32) * sigma
    n2 = rng.standard_normal(image.shape, dtype=np.float32) * sigma
    image = np.sqrt((image + n1) ** 2 + n2**2)
    brain_idx = np.flatnonzero(brain)
    hot = brain_idx[rng.integers(0, brain_idx.size, size=max(1, brain_idx.size // 5000))]
    image.reshape(-1)[hot] *= np.float32(rng.uniform(1.5, 2.5))
    image = np.clip(np.rint(image), 1, np.iinfo(np.int16).max)
    image[~brain] = 0
    return image.astype(np.int16)


def write_case(out_dir: str | Path, name: str, arrays: Dict[str, np.ndarray]) -> Path:
    """Write ``<out_dir>/<name>/<name>_{flair,t1,t1ce,t2,seg}.nii.gz`` atomically, with the release's header.

    Images are stored as int16, ``seg`` as uint8; affine :func:`brats_affine`, qform code 2 (aligned), sform code 1
    (scanner), units mm, as in the release.

    Returns:
        The case folder.

    Raises:
        ValueError: if ``name`` is not a plain name, a volume is missing, or the volumes differ in shape.
    """
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"name must be a plain case name without '/', found {name!r}")
    missing = [k for k in (*MODALITIES, "seg") if k not in arrays]
    if missing:
        raise ValueError(f"arrays for case {name} lack {missing} (found {sorted(arrays)})")
    shape = arrays["seg"].shape
    for key in (*MODALITIES, "seg"):
        if arrays[key].ndim != 3 or arrays[key].shape != shape:
            raise ValueError(f"case {name}: '{key}' has shape {arrays[key].shape}, expected 3-D {shape} like 'seg'")
    case_dir = Path(out_dir) / name
    affine = brats_affine(shape)
    for key in (*MODALITIES, "seg"):
        dtype = np.uint8 if key == "seg" else np.int16
        img = nib.Nifti1Image(np.asarray(arrays[key]).astype(dtype, copy=False), affine)
        img.set_qform(affine, code=2)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
        img.header.set_data_dtype(dtype)
        with atomic_path(case_dir / f"{name}_{key}.nii.gz", suffix=".nii.gz") as tmp:
            nib.save(img, tmp)
    return case_dir


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", required=True, help="folder that receives one sub-folder per case")
    parser.add_argument("--num_cases", type=int, required=True, help="number of cases to write")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=(240, 240, 155),
        metavar=("X", "Y", "Z"),
        help="volume size (default: 240 240 155, as released)",
    )
    parser.add_argument("--seed", type=int, default=1337, help="case i is drawn from default_rng([seed, i])")
    parser.add_argument("--start_index", type=int, default=1, help="number of the first case (default 1)")
    args = parser.parse_args(argv)
    if args.num_cases < 1:
        parser.error(f"--num_cases must be >= 1, found {args.num_cases}")
    if args.start_index < 0:
        parser.error(f"--start_index must be >= 0, found {args.start_index}")
    if min(args.shape) < MIN_SIDE:
        parser.error(f"every --shape side must be >= {MIN_SIDE}, found {tuple(args.shape)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (argument errors exit with 2 through argparse)."""
    args = _parse_args(argv)
    shape = tuple(args.shape)
    for index in range(args.start_index, args.start_index + args.num_cases):
        name = case_name(index)
        arrays = make_case(shape, np.random.default_rng([args.seed, index]))
        write_case(args.out_dir, name, arrays)
        labels = sorted(int(v) for v in np.unique(arrays["seg"]))
        tumour = float((arrays["seg"] > 0).sum()) / max(int((arrays["flair"] > 0).sum()), 1)
        print(f"{name}: labels {labels}, whole tumour {100 * tumour:.1f}% of the brain")
    print(f"wrote {args.num_cases} case(s) of shape {shape} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
