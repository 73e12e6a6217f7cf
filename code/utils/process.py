"""Worker processes that end with their parent.

A ``ProcessPoolExecutor`` worker waits for work on a pipe that the other workers also hold open, so when the
parent is killed (SIGKILL, out-of-memory killer) nothing wakes it: it lives on, holding memory and, mid-case,
a half-written temporary file. :func:`exit_with_parent` is a pool ``initializer`` that prevents this.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

__all__ = ["exit_with_parent"]

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def exit_with_parent(parent_pid: int, poll_seconds: float = 1.0) -> None:
    """Make the calling process end as soon as the process ``parent_pid`` is gone.

    On Linux the kernel sends SIGTERM on the parent's death (``prctl(PR_SET_PDEATHSIG, SIGTERM)``); elsewhere,
    or where that call fails, a daemon thread checks every ``poll_seconds`` whether the parent process id
    changed (an orphan is adopted by another process) and ends the process. If the parent already died before
    this call, the process ends at once. Use it as
    ``ProcessPoolExecutor(initializer=exit_with_parent, initargs=(os.getpid(),))``.

    Args:
        parent_pid: process id of the parent, taken in the parent (``os.getpid()``), not in the child.
        poll_seconds: interval of the fallback check.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
        except (OSError, AttributeError):  # no libc symbol table, or no prctl in it
            armed = False
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid, poll_seconds), daemon=True).start()


def _watch_parent(parent_pid: int, poll_seconds: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_seconds)
    os._exit(1)
