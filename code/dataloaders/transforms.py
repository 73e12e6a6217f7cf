"""Sample transforms for 3-D patches: draw the random parameters first, then apply them.

Every transform is a callable ``t(sample) -> sample`` on a dict with an ``'image'`` array, ``(D, H, W)`` or
``(C, D, H, W)``, and optionally a ``'label'`` array ``(D, H, W)`` (the original UG-MCL API, so
``Compose([RandomRotFlip(), RandomCrop((96, 96, 96)), ToTensor()])`` reads as before). Other keys (``'name'``)
pass through untouched. Spatial operations act on the last three axes of the image and on the label alike.

Random transforms split into ``get_params(...)`` (draws, as TorchIO's ``RandomFlip.get_params``) and ``apply(sample,
params)`` (deterministic). Randomness comes from the ``rng`` given to the constructor, a ``numpy.random.Generator``
(or a legacy ``RandomState``); by default the module-level ``numpy.random`` functions are used, so the draws follow
``np.random.seed`` and ``utils.seeding.seed_worker`` reseeds them per DataLoader worker. A ``Generator`` passed in is
copied into each worker process with the same state, so workers would repeat each other's draws: pass one only for
single-process use (tests, previews).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Callable, Dict, Tuple, Union

import numpy as np
import torch

from utils.types import Shape3D

__all__ = [
    "CenterCrop",
    "Compose",
    "RandomCrop",
    "RandomIntensity",
    "RandomNoise",
    "RandomRotFlip",
    "RandomRotFlipCrop",
    "ToTensor",
    "crop_or_pad",
    "parse_patch_size",
    "rot_flip",
]

Sample = Dict[str, Any]
RandomSource = Union[np.random.Generator, np.random.RandomState, None]


def parse_patch_size(size: Any, name: str = "output_size") -> Shape3D:
    """Check that ``size`` is three positive ints and return it as a tuple.

    Raises:
        ValueError: for anything else (a single int, a string such as ``"96"``, floats, zero or negative sides).
            A string is rejected explicitly: the original ``--patch_size`` was parsed as a list of characters.
    """
    if isinstance(size, (str, bytes)) or not isinstance(size, Sequence) and not isinstance(size, np.ndarray):
        raise ValueError(f"{name} must be three positive ints (D, H, W), found {size!r} of type {type(size).__name__}")
    items = list(size)
    if len(items) != 3 or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s <= 0 for s in items):
        raise ValueError(f"{name} must be three positive ints (D, H, W), found {size!r}")
    return (int(items[0]), int(items[1]), int(items[2]))


def _randint(rng: RandomSource, high: int) -> int:
    """One integer uniform in ``[0, high)``."""
    if rng is None:
        return int(np.random.randint(0, high))
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, high))
    return int(rng.randint(0, high))


def _uniform(rng: RandomSource, low: float, high: float) -> float:
    """One float uniform in ``[low, high)``."""
    source = np.random if rng is None else rng
    return float(source.uniform(low, high))


def _check_rng(rng: Any) -> RandomSource:
    if rng is not None and not isinstance(rng, (np.random.Generator, np.random.RandomState)):
        raise ValueError(f"rng must be a numpy Generator, RandomState or None, found {type(rng).__name__}")
    return rng


def _spatial_shape(sample: Sample) -> Shape3D:
    """The ``(D, H, W)`` shape shared by ``sample['image']`` (last three axes) and ``sample['label']``."""
    if "image" not in sample:
        raise ValueError(f"sample must have an 'image' entry, found keys {sorted(sample)}")
    image = sample["image"]
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be (D, H, W) or (C, D, H, W), found shape {tuple(image.shape)}")
    shape = tuple(int(s) for s in image.shape[-3:])
    label = sample.get("label")
    if label is not None and tuple(label.shape) != shape:
        raise ValueError(
            f"label shape {tuple(label.shape)} must equal the image's spatial shape {shape} "
            f"(image {tuple(image.shape)})"
        )
    return shape  # type: ignore[return-value]


def _map_arrays(sample: Sample, fn: Callable[[np.ndarray], np.ndarray]) -> Sample:
    """Apply ``fn`` to the image and (if present) the label; copy the other keys."""
    out = dict(sample)
    out["image"] = fn(sample["image"])
    if sample.get("label") is not None:
        out["label"] = fn(sample["label"])
    return out


def rot_flip(array: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Rotate by ``k`` quarter turns in the plane of the first two spatial axes, then flip one of them.

    Args:
        array: ``(D, H, W)`` or ``(C, D, H, W)``; the spatial axes are the last three.
        k: number of 90-degree turns, as ``np.rot90(array, k, axes=(-3, -2))``.
        axis: spatial axis to flip after the rotation, 0 (D) or 1 (H).

    Returns:
        A C-contiguous copy (``torch.from_numpy`` rejects negative strides).
    """
    if axis not in (0, 1):
        raise ValueError(f"flip axis must be 0 or 1 (a spatial axis of the rotation plane), found {axis}")
    out = np.rot90(array, k, axes=(-3, -2))
    out = np.flip(out, axis=axis - 3)
    return np.ascontiguousarray(out)


def crop_or_pad(source: Any, start: Sequence[int], size: Shape3D, fill: float = 0) -> np.ndarray:
    """Read the window ``[start, start + size)`` of the last three axes; the part outside ``source`` is ``fill``.

    ``start`` may be negative and the window may run past the end: that part is padding. ``source`` is anything
    sliceable with a ``shape`` and ``dtype`` (a numpy array or an ``h5py.Dataset``, so a patch can be read from disk
    without loading the whole volume).

    Args:
        source: ``(D, H, W)`` or ``(C, D, H, W)``.
        start: window start per spatial axis, in ``source`` coordinates.
        size: window size per spatial axis.
        fill: value of the padding.

    Returns:
        ``(*lead, *size)`` array of ``source.dtype``.
    """
    spatial = tuple(int(s) for s in source.shape[-3:])
    lead = tuple(int(s) for s in source.shape[:-3])
    src, dst = [], []
    for begin, length, dim in zip(start, size, spatial):
        lo, hi = max(begin, 0), min(begin + length, dim)
        if hi <= lo:  # the window misses the volume on this axis: all padding
            return np.full(lead + tuple(size), fill, dtype=source.dtype)
        src.append(slice(lo, hi))
        dst.append(slice(lo - begin, hi - begin))
    patch = source[(Ellipsis, *src)]
    patch = patch.copy() if isinstance(source, np.ndarray) else np.asarray(patch)  # never a view of the volume
    if patch.shape[-3:] == tuple(size):
        return patch
    out = np.full(lead + tuple(size), fill, dtype=source.dtype)
    out[(Ellipsis, *dst)] = patch
    return out


def _crop_start(shape: Shape3D, size: Shape3D, offset: Sequence[int]) -> Tuple[int, int, int]:
    """Window start in volume coordinates for an ``offset`` into the volume zero-padded up to ``size``.

    Axes shorter than the patch are padded by ``size - dim``, split as ``left = (size - dim) // 2`` and the rest on
    the right, so the start is ``offset - left``.
    """
    return tuple(o - max(s - d, 0) // 2 for o, s, d in zip(offset, size, shape))  # type: ignore[return-value]


class Compose:
    """Apply transforms in order (the ``torchvision.transforms.Compose`` the original used, without torchvision)."""

    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]) -> None:
        self.transforms = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise ValueError(f"every transform must be callable, found {t!r}")

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class RandomRotFlip:
    """Random ``rot90`` by ``k`` in {0, 1, 2, 3} in the plane of the first two spatial axes, then a flip of axis 0
    or 1; image and label get the same ``(k, axis)``.

    The draws are ``k = randint(0, 4)`` then ``axis = randint(0, 2)``, in the original's order, so under
    ``np.random.seed`` the default (global) source gives the released code's augmentations.

    Args:
        rng: numpy ``Generator``/``RandomState``; ``None`` (default) uses the global ``np.random``.
    """

    def __init__(self, rng: RandomSource = None) -> None:
        self.rng = _check_rng(rng)

    def get_params(self) -> Tuple[int, int]:
        """Draw ``(k, axis)``."""
        k = _randint(self.rng, 4)
        axis = _randint(self.rng, 2)
        return k, axis

    @staticmethod
    def apply(sample: Sample, params: Tuple[int, int]) -> Sample:
        k, axis = params
        return _map_arrays(sample, lambda a: rot_flip(a, k, axis))

    def __call__(self, sample: Sample) -> Sample:
        _spatial_shape(sample)
        return self.apply(sample, self.get_params())

    def __repr__(self) -> str:
        return "RandomRotFlip()"


class RandomCrop:
    """Random ``output_size`` window; axes shorter than the window are zero-padded first.

    Padding of ``p = output_size - dim`` voxels is split ``p // 2`` before and the rest after. Each start offset in
    ``0 .. padded_dim - output_size`` is equally likely, the last one included (the original drew
    ``randint(0, dim - size)``, which never reaches the last position, and padded 3 extra voxels per side whenever
    ``dim <= size``; here padding is exact, so a short axis is always fully inside the patch).

    Args:
        output_size: ``(D, H, W)`` patch, three positive ints.
        rng: numpy ``Generator``/``RandomState``; ``None`` (default) uses the global ``np.random``.

    Raises:
        ValueError: if ``output_size`` is not three positive ints.
    """

    def __init__(self, output_size: Sequence[int], rng: RandomSource = None) -> None:
        self.output_size = parse_patch_size(output_size)
        self.rng = _check_rng(rng)

    def get_params(self, shape: Sequence[int]) -> Tuple[int, int, int]:
        """Draw the window start, in volume coordinates (negative on a padded axis), for a ``(D, H, W)`` volume."""
        shape3 = tuple(int(s) for s in shape)
        offset = [_randint(self.rng, max(d - s, 0) + 1) for d, s in zip(shape3, self.output_size)]
        return _crop_start(shape3, self.output_size, offset)  # type: ignore[arg-type]

    def read(self, source: Any, start: Sequence[int]) -> np.ndarray:
        """The window of ``source`` (array or ``h5py.Dataset``) at ``start``: reads only the window."""
        return crop_or_pad(source, start, self.output_size)

    def apply(self, sample: Sample, start: Sequence[int]) -> Sample:
        return _map_arrays(sample, lambda a: self.read(a, start))

    def __call__(self, sample: Sample) -> Sample:
        return self.apply(sample, self.get_params(_spatial_shape(sample)))

    def __repr__(self) -> str:
        return f"RandomCrop(output_size={self.output_size})"


class RandomRotFlipCrop:
    """:class:`RandomRotFlip` then :class:`RandomCrop` as one step that reads only the patch's box of the volume.

    The same random draws, in the same order, and the same arrays as ``Compose([RandomRotFlip(rng),
    RandomCrop(output_size, rng)])`` (the released training augmentation), but the rotation and flip map the
    crop window back to a box of the unrotated volume, so only that box is read (from an ``h5py.Dataset`` too:
    :class:`dataloaders.brats2019.BraTS2019` hands this transform the open datasets) and only the patch is rotated.
    For a 96^3 patch of a 160x190x140 BraTS volume that is a fifth of the voxels. When the rotated volume is
    smaller than the patch in the rotation plane (padding there), the whole volume is read and transformed.

    Args:
        output_size: ``(D, H, W)`` patch, three positive ints.
        rng: numpy ``Generator``/``RandomState``; ``None`` (default) uses the global ``np.random``.
    """

    def __init__(self, output_size: Sequence[int], rng: RandomSource = None) -> None:
        self.rot_flip = RandomRotFlip(rng)
        self.crop = RandomCrop(output_size, rng)
        self.output_size = self.crop.output_size

    def get_params(self, shape: Sequence[int]) -> Tuple[int, int, Tuple[int, int, int]]:
        """Draw ``(k, axis, start)`` for a ``(D, H, W)`` volume; ``start`` is in the rotated volume's coordinates."""
        k, axis = self.rot_flip.get_params()
        d, h, w = (int(s) for s in shape)
        rotated = (h, d, w) if k % 2 else (d, h, w)
        return k, axis, self.crop.get_params(rotated)

    def read(self, source: Any, params: Tuple[int, int, Sequence[int]]) -> np.ndarray:
        """The patch of ``source`` (``(D, H, W)`` or ``(C, D, H, W)`` array or ``h5py.Dataset``) for ``params``."""
        k, axis, start = params
        box = self.source_box(tuple(int(s) for s in source.shape[-3:]), params)
        if box is None:
            volume = source if isinstance(source, np.ndarray) else np.asarray(source[()])
            return crop_or_pad(rot_flip(volume, k, axis), start, self.output_size)
        box_start, box_size = box
        return np.ascontiguousarray(rot_flip(crop_or_pad(source, box_start, box_size), k, axis))

    def source_box(
        self, shape: Sequence[int], params: Tuple[int, int, Sequence[int]]
    ) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]] | None:
        """``(start, size)`` of the unrotated box that holds the patch, or None when it needs padding in the plane.

        The window's voxels are found by rotating and flipping a ``(D, H)`` grid of their coordinates exactly as
        the volume is; the last axis is not moved (padding there is left to :func:`crop_or_pad`).
        """
        k, axis, start = params
        d, h = int(shape[0]), int(shape[1])
        size = self.output_size
        rotated = (h, d) if k % 2 else (d, h)
        if any(s < 0 or s + n > r for s, n, r in zip(start[:2], size[:2], rotated)):
            return None
        grid = np.stack(np.meshgrid(np.arange(d), np.arange(h), indexing="ij"))[..., None]  # (2, D, H, 1)
        moved = rot_flip(grid, k, axis)[:, start[0] : start[0] + size[0], start[1] : start[1] + size[1], 0]
        lo, hi = moved.reshape(2, -1).min(axis=1), moved.reshape(2, -1).max(axis=1)
        box_start = (int(lo[0]), int(lo[1]), int(start[2]))
        box_size = (int(hi[0] - lo[0] + 1), int(hi[1] - lo[1] + 1), int(size[2]))
        return box_start, box_size

    def __call__(self, sample: Sample) -> Sample:
        params = self.get_params(_spatial_shape(sample))
        return _map_arrays(sample, lambda a: self.read(a, params))

    def __repr__(self) -> str:
        return f"RandomRotFlipCrop(output_size={self.output_size})"


class CenterCrop:
    """Central ``output_size`` window; axes shorter than the window are zero-padded (split as in :class:`RandomCrop`).

    The start on an axis is ``(dim - size) // 2`` (floor; the original used Python's ``round``, which rounds half to
    even, so odd differences went left or right depending on the number).

    Args:
        output_size: ``(D, H, W)`` patch, three positive ints.

    Raises:
        ValueError: if ``output_size`` is not three positive ints.
    """

    def __init__(self, output_size: Sequence[int]) -> None:
        self.output_size = parse_patch_size(output_size)

    def get_params(self, shape: Sequence[int]) -> Tuple[int, int, int]:
        shape3 = tuple(int(s) for s in shape)
        offset = [max(d - s, 0) // 2 for d, s in zip(shape3, self.output_size)]
        return _crop_start(shape3, self.output_size, offset)  # type: ignore[arg-type]

    def __call__(self, sample: Sample) -> Sample:
        start = self.get_params(_spatial_shape(sample))
        return _map_arrays(sample, lambda a: crop_or_pad(a, start, self.output_size))

    def __repr__(self) -> str:
        return f"CenterCrop(output_size={self.output_size})"


class RandomIntensity:
    """Random global intensity change of the image: ``image * scale + shift``; the label is untouched.

    Args:
        scale_range: ``(low, high)`` for ``scale ~ U(low, high)``; default ``(0.9, 1.1)``.
        shift_range: ``(low, high)`` for ``shift ~ U(low, high)``; default ``(-0.1, 0.1)`` (z-scored images).
        rng: numpy ``Generator``/``RandomState``; ``None`` (default) uses the global ``np.random``.

    Raises:
        ValueError: if a range is not two finite numbers with ``low <= high``.
    """

    def __init__(
        self,
        scale_range: Tuple[float, float] = (0.9, 1.1),
        shift_range: Tuple[float, float] = (-0.1, 0.1),
        rng: RandomSource = None,
    ) -> None:
        self.scale_range = self._check_range(scale_range, "scale_range")
        self.shift_range = self._check_range(shift_range, "shift_range")
        self.rng = _check_rng(rng)

    @staticmethod
    def _check_range(value: Any, name: str) -> Tuple[float, float]:
        try:
            low, high = (float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be two numbers (low, high), found {value!r}") from None
        if not (np.isfinite(low) and np.isfinite(high) and low <= high):
            raise ValueError(f"{name} must be finite with low <= high, found {value!r}")
        return low, high

    def get_params(self) -> Tuple[float, float]:
        """Draw ``(scale, shift)``."""
        return _uniform(self.rng, *self.scale_range), _uniform(self.rng, *self.shift_range)

    @staticmethod
    def apply(sample: Sample, params: Tuple[float, float]) -> Sample:
        scale, shift = params
        out = dict(sample)
        image = np.asarray(sample["image"])
        dtype = image.dtype if np.issubdtype(image.dtype, np.floating) else np.float32
        out["image"] = (image * scale + shift).astype(dtype, copy=False)
        return out

    def __call__(self, sample: Sample) -> Sample:
        _spatial_shape(sample)
        return self.apply(sample, self.get_params())

    def __repr__(self) -> str:
        return f"RandomIntensity(scale_range={self.scale_range}, shift_range={self.shift_range})"


class RandomNoise:
    """Additive Gaussian noise on the image, as the original's ``RandomNoise``:
    ``image + clip(sigma * N(0, 1), -2 sigma, 2 sigma) + mu``.

    Args:
        mu: constant added (default 0).
        sigma: noise standard deviation before clipping (default 0.1), >= 0.
        rng: numpy ``Generator``/``RandomState``; ``None`` (default) uses the global ``np.random``.
    """

    def __init__(self, mu: float = 0.0, sigma: float = 0.1, rng: RandomSource = None) -> None:
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, found {sigma}")
        self.mu = float(mu)
        self.sigma = float(sigma)
        self.rng = _check_rng(rng)

    def __call__(self, sample: Sample) -> Sample:
        _spatial_shape(sample)
        image = np.asarray(sample["image"])
        source = np.random if self.rng is None else self.rng
        noise = np.clip(self.sigma * source.standard_normal(image.shape), -2 * self.sigma, 2 * self.sigma) + self.mu
        out = dict(sample)
        dtype = image.dtype if np.issubdtype(image.dtype, np.floating) else np.float32
        out["image"] = (image + noise).astype(dtype, copy=False)
        return out

    def __repr__(self) -> str:
        return f"RandomNoise(mu={self.mu}, sigma={self.sigma})"


class ToTensor:
    """numpy sample to tensors: image ``(D, H, W)`` -> float32 ``(1, D, H, W)`` (``(C, D, H, W)`` is kept),
    label -> int64 ``(D, H, W)``. Other keys pass through.
    """

    def __call__(self, sample: Sample) -> Sample:
        _spatial_shape(sample)
        out = dict(sample)
        image = np.ascontiguousarray(sample["image"], dtype=np.float32)
        if image.ndim == 3:
            image = image[None]
        out["image"] = torch.from_numpy(image)
        label: np.ndarray | None = sample.get("label")
        if label is not None:
            out["label"] = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64, copy=False))
        return out

    def __repr__(self) -> str:
        return "ToTensor()"
