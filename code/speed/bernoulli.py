"""``bernoulli_mask``: the boolean dropout mask that torch's ``bernoulli_`` would draw, drawn with cheaper calls on CPU.

On CPUs where torch runs its own ``bernoulli_(p)`` kernel (every CPU except Intel ones with MKL, which get MKL's
kernel), each element costs one 64-bit draw of torch's Mersenne Twister, turned into a 53-bit uniform ``u`` in
[0, 1), and the element is ``u < p``; that kernel is serial. A float64 ``uniform_`` turns the same draws into the
same ``u`` in a vectorised loop, so comparing its output with ``p`` gives the same mask and leaves the generator in
the same state. Whether the two agree is checked once per dtype on a private generator; where they do not (MKL, a
future torch), ``bernoulli_`` itself is used. Timings are in ``results/cpu.md``.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["bernoulli_mask"]

_CHUNK = 1 << 20  # float64 scratch of 8 MB per draw
_CHECK_SIZE = 4099  # odd, several vector widths long


def _bernoulli_reference(shape: Sequence[int], keep_prob: float, dtype: torch.dtype, device: torch.device,
                         generator: torch.Generator | None) -> Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device=device).bernoulli_(keep_prob, generator=generator) != 0


def _uniform_compare(shape: Sequence[int], keep_prob: float, generator: torch.Generator | None) -> Tensor:
    """``uniform_ (float64) < keep_prob``, chunk by chunk into one boolean tensor (CPU)."""
    mask = torch.empty(tuple(shape), dtype=torch.bool)
    flat = mask.view(-1)
    scratch = torch.empty(min(_CHUNK, flat.numel()), dtype=torch.float64)
    for start in range(0, flat.numel(), _CHUNK):
        stop = min(start + _CHUNK, flat.numel())
        torch.lt(scratch[: stop - start].uniform_(generator=generator), keep_prob, out=flat[start:stop])
    return mask


@functools.cache
def uniform_matches_bernoulli(dtype: torch.dtype) -> bool:
    """True if, on CPU, ``bernoulli_`` on a ``dtype`` tensor draws what :func:`_uniform_compare` draws (masks and
    generator state afterwards), checked once on a private generator."""
    first, second = torch.Generator().manual_seed(20240607), torch.Generator().manual_seed(20240607)
    try:
        expected = _bernoulli_reference((_CHECK_SIZE,), 0.7, dtype, torch.device("cpu"), first)
    except RuntimeError:  # bernoulli_ not implemented for this dtype
        return False
    drawn = _uniform_compare((_CHECK_SIZE,), 0.7, second)
    return torch.equal(expected, drawn) and torch.equal(first.get_state(), second.get_state())


def bernoulli_mask(
    shape: Sequence[int],
    keep_prob: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """``torch.empty(shape, dtype=dtype, device=device).bernoulli_(keep_prob, generator=generator) != 0``, faster.

    The same mask, from the same random numbers, with the generator left in the same state, on every device and
    CPU: the fast path is taken only where it was checked to agree (see the module docstring).

    Args:
        shape: the mask's shape, e.g. (B, C, D, H, W).
        keep_prob: probability of True (``1 - p`` for dropout rate p), in [0, 1].
        dtype: the dtype ``bernoulli_`` would fill (dropout draws in the activations' dtype).
        device: where the mask lives.
        generator: a ``torch.Generator`` on that device; None = torch's default one.
    Returns:
        a boolean tensor of ``shape`` on ``device``.
    Raises:
        ValueError: if ``keep_prob`` is not in [0, 1].
    """
    if not 0.0 <= keep_prob <= 1.0 or math.isnan(keep_prob):
        raise ValueError(f"keep_prob must be in [0, 1], but found {keep_prob}")
    device = torch.device(device)
    if device.type == "cpu" and not torch.compiler.is_compiling() and uniform_matches_bernoulli(dtype):
        return _uniform_compare(shape, float(keep_prob), generator)
    return _bernoulli_reference(shape, keep_prob, dtype, device, generator)
