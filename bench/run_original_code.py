"""Run the original (released) UG-MCL research code unchanged on a machine without CUDA, for timing (issue #7).

The released ``train_UGMCL_3D.py`` calls ``.cuda()`` on its networks and tensors, so it cannot start on a CPU-only
machine. This launcher makes those calls return the object itself when CUDA is absent, then runs the script as
``__main__`` with the remaining arguments. Run it from the released repository's ``code/`` folder::

    python /path/to/this/repo/bench/run_original_code.py train_UGMCL_3D.py --root_path ../data/BraTS2019 \
        --max_iterations 8

Nothing of the released code is changed or copied. One more stand-in: the script imports ``torchvision`` for
``transforms.Compose`` and ``utils.make_grid`` (TensorBoard images every 20 iterations). Where ``torchvision``
cannot be imported (no wheel matches a CPU build of torch, for example), small stand-ins with those two names are
installed and a line on stderr says so. ``bench/bench_train_loop.py --original_code`` and ``bench/bench_infer.py
--original_code`` use this launcher.
"""

from __future__ import annotations

import runpy
import sys
import types
from typing import Any, Callable, Sequence


def _compose(steps: Sequence[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """``transforms.Compose``: apply ``steps`` in order."""

    def apply(sample: Any) -> Any:
        for step in steps:
            sample = step(sample)
        return sample

    return apply


def _make_grid(images: Any, nrow: int = 8, padding: int = 2, normalize: bool = False, **_: Any) -> Any:
    """A plain ``utils.make_grid``: ``(N, C, H, W)`` images side by side in rows of ``nrow``, as ``(C, H', W')``."""
    images = images.float()
    if normalize:
        low, high = images.min(), images.max()
        images = (images - low) / (high - low).clamp_min(1e-5)
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    grid = images.new_zeros(c, rows * (h + padding) + padding, nrow * (w + padding) + padding)
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


def install_torchvision_stand_ins() -> bool:
    """Make ``torchvision.transforms.Compose`` and ``torchvision.utils.make_grid`` importable.

    Returns:
        True if stand-ins were installed, False if the real ``torchvision`` imports.
    """
    try:
        import torchvision.transforms  # noqa: F401
        import torchvision.utils  # noqa: F401

        return False
    except Exception:  # ImportError, or a C extension built for another torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    package = types.ModuleType("torchvision")
    package.__path__ = []  # a package, so that "from torchvision import transforms" works
    package.transforms = types.ModuleType("torchvision.transforms")
    package.transforms.Compose = _compose
    package.utils = types.ModuleType("torchvision.utils")
    package.utils.make_grid = _make_grid
    sys.modules.update(
        {"torchvision": package, "torchvision.transforms": package.transforms, "torchvision.utils": package.utils}
    )
    return True


def make_cuda_calls_no_ops() -> None:
    """``Module.cuda()`` and ``Tensor.cuda()`` return their object unchanged (for a machine without CUDA)."""
    import torch

    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or not argv[0].endswith(".py"):
        print("usage: run_original_code.py SCRIPT.py [script arguments ...]", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        make_cuda_calls_no_ops()
        print("run_original_code: no CUDA, .cuda() calls are no-ops", file=sys.stderr)
    if install_torchvision_stand_ins():
        print("run_original_code: torchvision does not import here, stand-ins for Compose and make_grid", file=sys.stderr)
    sys.argv = list(argv)
    sys.path.insert(0, ".")  # the released scripts import their packages from the working directory
    runpy.run_path(argv[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
