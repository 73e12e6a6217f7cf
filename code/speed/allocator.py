"""Let glibc keep freed memory for reuse, so repeated large allocations on CPU stop page-faulting.

By default glibc serves each large block (the activations of a 3-D U-Net are tens to hundreds of MB each) with a
fresh ``mmap`` and unmaps it when it is freed, so every iteration page-faults and the kernel zero-fills its memory
again. Raising the ``mmap`` threshold and the trim threshold (:func:`keep_freed_memory`) makes such blocks come from
the heap and stay there for the next iteration; the heap then also holds blocks of every size the iteration used,
so the peak RSS grows. :func:`keeping_freed_memory` does it only around the work that repeats the same allocations
(the teacher's passes, a validation, the sliding window over one case). The settings are process-wide, change speed
and memory only, and apply to glibc on Linux. Measurements: ``results/cpu.md``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator
from typing import Any

__all__ = [
    "heap_free_bytes",
    "keep_freed_memory",
    "keeping_freed_memory",
    "stop_keeping_freed_memory",
    "trim_freed_memory",
]

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
_NEVER_TRIM = (1 << 31) - 1


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (``<malloc.h>``, glibc 2.33 and later)."""

    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]


@functools.cache  # find_library runs ldconfig in a subprocess: once per process
def _libc() -> Any:
    """glibc as a ``ctypes`` library with ``mallopt``, or None where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - raise AttributeError here, not at the first use
    except (OSError, AttributeError):
        return None
    if hasattr(libc, "mallinfo2"):  # glibc 2.33 and later
        libc.mallinfo2.restype = _MallInfo2
    return libc


def _set_mmap_threshold(mmap_threshold: int) -> Any:
    """glibc after setting its ``mmap`` threshold to ``mmap_threshold`` bytes, or None where it did not take it."""
    if mmap_threshold <= 0:
        raise ValueError(f"mmap_threshold must be positive, got {mmap_threshold}")
    libc = _libc()
    return libc if libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 else None


def keep_freed_memory(mmap_threshold: int = 1 << 30) -> bool:
    """Serve blocks below ``mmap_threshold`` bytes from the heap and never trim it; True if glibc took both settings.

    Call once, before the large allocations (a block already mapped is unmapped as before). Returns False where it
    does not apply (no glibc, e.g. macOS or musl), leaving the allocator as it was.

    Args:
        mmap_threshold: blocks this large or larger still get their own ``mmap``. Default 1 GiB.
    """
    libc = _set_mmap_threshold(mmap_threshold)
    return libc is not None and libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1


def stop_keeping_freed_memory(mmap_threshold: int = 4 << 20) -> bool:
    """Undo :func:`keep_freed_memory` for large blocks: True if glibc took the setting, False where it does not apply.

    From then on a block of ``mmap_threshold`` bytes or more that no free space of the heap can hold gets its own
    ``mmap`` again, unmapped when it is freed. What the heap already holds stays there for reuse (nothing is trimmed:
    returning it would only make the next round of the same work fault it in again).

    Args:
        mmap_threshold: smallest block that gets its own mapping. Default 4 MiB.
    """
    return _set_mmap_threshold(mmap_threshold) is not None


def heap_free_bytes() -> int | None:
    """Bytes that glibc's heap holds free (``mallinfo2().fordblks``), or None where it cannot say."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    return int(libc.mallinfo2().fordblks)


def trim_freed_memory(min_free_bytes: int = 1 << 30) -> bool:
    """Give the heap's free pages back to the system (``malloc_trim(0)``) if it holds ``min_free_bytes`` or more free.

    Returns True if it trimmed. Where glibc cannot say how much is free (before 2.33, or no glibc), nothing happens.
    """
    free = heap_free_bytes()
    if free is None or free < min_free_bytes:
        return False
    _libc().malloc_trim(0)
    return True


@contextlib.contextmanager
def keeping_freed_memory(trim_above: int = 1 << 30) -> Iterator[bool]:
    """Keep freed memory (:func:`keep_freed_memory`) inside the block, map large blocks again after it
    (:func:`stop_keeping_freed_memory`), and then give the heap's free pages back if there are ``trim_above`` bytes
    or more of them (:func:`trim_freed_memory`); yields whether glibc took the setting.

    For work that repeats the same large allocations (the no-grad teacher passes of a training step), followed by
    work that keeps many large blocks alive at once (the student's forward and backward): the first stops
    page-faulting, and the second does not pile its blocks onto the heap. Without the trim, the student's blocks
    would take the heap's free parts that fit them, so the teacher's next passes would find the heap cut up and grow
    it from step to step. A heap holding less than ``trim_above`` free is not trimmed (small runs, where trimming
    every step costs more than it saves).
    """
    kept = keep_freed_memory()
    try:
        yield kept
    finally:
        if kept:
            stop_keeping_freed_memory()
            trim_freed_memory(trim_above)
