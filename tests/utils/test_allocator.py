"""utils/allocator.py: glibc keeps freed memory, so repeated large allocations stop page-faulting."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from utils import allocator
from utils.allocator import keep_freed_memory

CODE = Path(__file__).resolve().parents[2] / "code"

# 20 rounds of allocating, writing and freeing a 64 MB tensor; prints the minor page faults of those rounds. The
# first rounds fault either way (with the setting, 5 to 7 of them measured here before the heap settles), so 12
# untimed rounds come first.
_PROGRAM = """
import resource, sys, torch
sys.path.insert(0, {code!r})
from utils.allocator import keep_freed_memory
if {keep}:
    assert keep_freed_memory()
for _ in range(12):  # the first rounds fault either way
    x = torch.empty(16 << 20).fill_(1.0); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    x = torch.empty(16 << 20)
    x.fill_(1.0)
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep: bool) -> int:
    program = _PROGRAM.format(code=str(CODE), keep=keep)
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc")
def test_repeated_large_allocations_stop_page_faulting():
    default, kept = _faults(False), _faults(True)
    assert default > 20 * 10_000  # each fresh 64 MB mapping faults in its ~16k pages (fewer with huge pages)
    assert kept < default / 3  # measured here: 0 against ~328k (with 3 untimed rounds: 82k to 115k)


def test_threshold_must_be_positive():
    with pytest.raises(ValueError, match="mmap_threshold must be positive"):
        keep_freed_memory(0)


@pytest.mark.parametrize(
    ("device_type", "enabled", "called"), [("cpu", True, True), ("cpu", False, False), ("cuda", True, False)]
)
def test_keep_freed_memory_on_cpu_only_where_asked(monkeypatch, device_type, enabled, called):
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    assert allocator.keep_freed_memory_on_cpu(device_type, enabled) is called
    assert calls == ([1] if called else [])
