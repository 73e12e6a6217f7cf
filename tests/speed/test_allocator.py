"""speed/allocator.py: glibc keeps freed memory, so repeated large allocations stop page-faulting; the speed door
(``speed.prepare_training`` / ``prepare_inference``) keeps it where ``keep_freed_memory`` asks."""

from __future__ import annotations

import contextlib
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import speed
import speed.passes
from networks.unet_3D import unet_3D
from speed import SpeedOptions, allocator, prepare_inference, prepare_training
from speed.allocator import keep_freed_memory, stop_keeping_freed_memory

CODE = Path(__file__).resolve().parents[2] / "code"

# 20 rounds of allocating, writing and freeing a 64 MB tensor; prints the minor page faults of those rounds. The
# first rounds fault either way (with the setting, 5 to 7 of them measured here before the heap settles), so 12
# untimed rounds come first.
_PROGRAM = """
import resource, sys, torch
sys.path.insert(0, {code!r})
from speed.allocator import keep_freed_memory
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
    with pytest.raises(ValueError, match="mmap_threshold must be positive"):
        stop_keeping_freed_memory(-1)


# Inside keeping_freed_memory(): rounds of a 64 MB tensor stop faulting and a freed 512 MB tensor stays resident.
# After the block, what the heap holds is reused (64 MB rounds still do not fault), but a 768 MB tensor, larger than
# any free part of the heap, gets its own mapping, which goes back when it is freed.
_PHASES = """
import resource, sys, torch
sys.path.insert(0, {code!r})
from speed.allocator import keeping_freed_memory

def faults(rounds, numel=16 << 20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        x = torch.empty(numel); x.fill_(1.0); del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

with keeping_freed_memory(trim_above=1 << 40) as kept:  # no trim here (the heap ends with ~1 GB free): see below
    faults(12)  # the first rounds fault either way
    inside = faults(20)
    before_big = rss_mb()
    faults(1, 128 << 20)
    kept_inside_mb = rss_mb() - before_big
after = faults(20)
before_huge = rss_mb()
huge = faults(1, 192 << 20)
print(kept, inside, round(kept_inside_mb), after, huge, round(rss_mb() - before_huge))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc")
def test_keeping_freed_memory_keeps_it_inside_the_block_and_maps_large_blocks_after():
    program = _PHASES.format(code=str(CODE))
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
    kept, inside, kept_inside_mb, after, huge, kept_after_mb = (int(v) if v.isdigit() else v for v in out.split())
    assert kept == "True"
    assert inside < 20 * 1_000  # measured: 0 (each fresh 64 MB round faults ~16k pages)
    assert kept_inside_mb > 300  # the freed 512 MB tensor stayed resident (measured: 448 to 512 MB)
    assert after < 20 * 1_000  # the heap is not trimmed: its memory is reused
    assert huge > 150_000  # a fresh mapping: ~196k pages
    assert kept_after_mb < 100  # and it was unmapped when freed


@pytest.mark.parametrize(
    ("device_type", "option", "called"),
    [("cpu", 1, True), ("cpu", 2, False), ("cpu", 0, False), ("cuda", 1, False)],
)
def test_the_door_keeps_freed_memory_throughout_on_cpu_only_where_asked(monkeypatch, device_type, option, called):
    calls = []
    monkeypatch.setattr(speed, "keep_freed_memory", lambda: calls.append(1) or True)
    training = prepare_training(unet_3D(feature_scale=16), SpeedOptions(keep_freed_memory=option),
                                torch.device(device_type))
    assert calls == ([1] if called else [])
    assert any("glibc keeps freed memory for reuse" in note for note in training.notes) is called
    if device_type == "cpu":
        prepare_inference(unet_3D(feature_scale=16), SpeedOptions(keep_freed_memory=option), device_type)
        assert calls == ([1, 1] if called else [])


@pytest.mark.parametrize(
    ("device_type", "option", "around"), [("cpu", 2, True), ("cpu", 1, False), ("cpu", 0, False), ("cuda", 2, False)]
)
def test_the_door_keeps_freed_memory_around_repeated_passes_with_option_2_on_cpu(
        monkeypatch, device_type, option, around):
    entered = []

    @contextlib.contextmanager
    def probe(trim_above: int = 1 << 30):
        entered.append(1)
        yield True

    monkeypatch.setattr(speed, "keep_freed_memory", lambda: True)
    monkeypatch.setattr(speed, "keeping_freed_memory", probe)
    monkeypatch.setattr(speed.passes, "keeping_freed_memory", probe)
    training = prepare_training(unet_3D(feature_scale=16), SpeedOptions(keep_freed_memory=option),
                                torch.device(device_type))
    assert training.passes.keep_memory_around_teacher is around
    for context in (training.around_validation(), training.passes.around_teacher()):
        with context:
            pass
    assert len(entered) == (2 if around else 0)
    if device_type == "cpu":
        with prepare_inference(unet_3D(feature_scale=16), SpeedOptions(keep_freed_memory=option), "cpu").around_case():
            pass
        assert len(entered) == (3 if around else 0)


def test_keep_freed_memory_option_out_of_range_raises():
    with pytest.raises(ValueError, match="--keep_freed_memory must be one of"):
        SpeedOptions(keep_freed_memory=3)


# After keeping_freed_memory(trim_above=...): a heap holding more free memory than trim_above gives its pages back,
# one holding less keeps them. Prints the RSS (MB) still held after freeing a 512 MB tensor inside the block, for a
# trim_above of 256 MB and of 4 GB, and what trim_freed_memory says with nothing left to trim.
_TRIM = """
import resource, sys, torch
sys.path.insert(0, {code!r})
from speed.allocator import heap_free_bytes, keeping_freed_memory, trim_freed_memory

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

held = []
for trim_above in (256 << 20, 4 << 30):
    before = rss_mb()
    with keeping_freed_memory(trim_above=trim_above):
        x = torch.empty(128 << 20); x.fill_(1.0); del x  # 512 MB, freed into the heap
        free_inside = heap_free_bytes()
    held.append(round(rss_mb() - before))
print(held[0], held[1], free_inside >= 512 << 20, trim_freed_memory(4 << 30))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc")
def test_keeping_freed_memory_trims_a_heap_with_more_free_than_trim_above():
    if allocator.heap_free_bytes() is None:
        pytest.skip("glibc before 2.33 has no mallinfo2")
    program = _TRIM.format(code=str(CODE))
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
    trimmed_mb, kept_mb, saw_free, trimmed_again = out.split()
    assert int(trimmed_mb) < 100  # 512 MB free > 256 MB: given back
    assert int(kept_mb) > 300  # 512 MB free < 4 GB: kept for reuse
    assert saw_free == "True"  # mallinfo2 counted the freed tensor as free heap
    assert trimmed_again == "False"  # under its threshold, trim_freed_memory does nothing
