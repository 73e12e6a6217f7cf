"""Tests of code/utils/process.py: a process that calls exit_with_parent ends when its parent is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CODE = Path(__file__).resolve().parents[2] / "code"

# The child arms exit_with_parent (optionally with prctl made unavailable, for the polling fallback), says so,
# then sleeps far longer than any test waits.
CHILD = f"""
import sys, time
sys.path.insert(0, {str(CODE)!r})
import utils.process as process
if sys.argv[2] == "polling":
    process.sys.platform = "no-prctl"
process.exit_with_parent(int(sys.argv[1]), poll_seconds=0.05)
print("armed", flush=True)
time.sleep(120)
"""
PARENT = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]])
print(child.pid, flush=True)
time.sleep(120)
"""


def _running(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"  # an orphaned zombie waiting to be reaped has ended


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from Linux /proc")
@pytest.mark.parametrize("mode", ["prctl", "polling"])
def test_child_ends_soon_after_its_parent_is_killed(mode):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, mode], stdout=subprocess.PIPE, text=True, env={**os.environ}
    )
    child = None
    try:
        child = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "armed"
        assert _running(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _running(child):
            time.sleep(0.02)
        assert not _running(child)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None and _running(child):
            os.kill(child, signal.SIGKILL)


def test_child_whose_parent_already_died_ends_at_once():
    # parent_pid 0 is never our parent: as if the parent had died before the worker got to arm the check
    proc = subprocess.run([sys.executable, "-c", CHILD, "0", "prctl"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "armed" not in proc.stdout
