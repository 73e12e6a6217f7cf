"""Let glibc keep freed memory for reuse, so repeated large allocations on CPU stop page-faulting (issue #7).

By default glibc serves each large block (every activation of a 3-D U-Net is tens to hundreds of MB) with a fresh
``mmap`` and unmaps it when it is freed, so every iteration page-faults and the kernel zero-fills all of its memory
again: ~40 % of a released-like CPU iteration is spent there. Raising the ``mmap`` threshold and the trim threshold
(:func:`keep_freed_memory`) makes such blocks come from the heap and stay there for the next iteration; the
heap then also holds blocks of every size the iteration used, so the peak RSS grows. :func:`keeping_freed_memory`
does it only around the work that repeats the same allocations (the teacher's passes, a validation): most of the
speed at about glibc's default peak RSS. Measured with ``bench/bench_train.py`` (2-core machine, 96^3, batch 4, T 8,
fast network, 6 iterations, one run; identical losses): glibc's default 49.5 s per iteration and 3.85 GiB peak RSS,
kept around the teacher's passes and trimmed after them (training's CPU default) 41.8 s and 3.66 GiB, kept
throughout 38.5 s and 6.33 GiB.
Sliding-window inference gains as much: a 144x176x144 volume in 10.5 s instead of 15.5 s (plain network, one window
per pass; 7.9 s instead of 9.9 s with the fast network and 4), identical labels, peak RSS +0.1 / +0.4 GiB. The
settings are process-wide, affect speed and memory only, and apply to glibc on Linux.
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
    "keep_freed_memory_on_cpu",
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


@functools.cache  # find_library runs ldconfig in a subprocess: once per process, not once per training step
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
    still take the heap's free parts that fit them, so the teacher's next passes find the heap cut up and grow it:
    at 96^3, batch 4 the peak RSS rose from 3.6 GiB after 3 iterations to 4.9 GiB after 6 (5.7 GiB in the training
    loop). With it, 6 iterations peaked at 3.6 GiB (glibc's default: 3.9 GiB; kept throughout: 5.6 GiB after 3),
    at 41.9 s per iteration against 38.2 s untrimmed. Small runs, whose heap holds less than ``trim_above`` free,
    are not trimmed: at the demo's size trimming every step cost 16 %.
    """
    kept = keep_freed_memory()
    try:
        yield kept
    finally:
        if kept:
            stop_keeping_freed_memory()
            trim_freed_memory(trim_above)


def keep_freed_memory_on_cpu(device_type: str, enabled: bool = True) -> bool:
    """:func:`keep_freed_memory` for a run on ``device_type`` if ``enabled`` and that is ``"cpu"``; True if set.

    ``test_3D_dt.py`` and ``predict.py`` call this once, after choosing their device (``--keep_freed_memory``, on by
    default): on a GPU the large tensors do not live in glibc's heap, so nothing is changed there.
    """
    return device_type == "cpu" and enabled and keep_freed_memory()
