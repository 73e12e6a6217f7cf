"""Tests of code/utils/atomic.py: atomic writes, the cleanup of stale temporaries, and the writability check."""

from __future__ import annotations

import errno
import os

import pytest
from conftest import mounted_tmpfs

from utils.atomic import (
    NotWritableError,
    atomic_path,
    atomic_write_bytes,
    check_writable,
    is_part_file,
    remove_stale_parts,
)


def test_atomic_write_bytes_writes_everything(tmp_path):
    data = os.urandom(3 << 20)
    atomic_write_bytes(tmp_path / "f.bin", data)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_write_bytes_keeps_the_old_file_when_the_disk_fills_up(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        if fd <= 2:
            return real_write(fd, data)
        real_write(fd, bytes(data)[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(target, b"new content" * 100)
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_temporaries_are_recognised_and_only_they_are_removed(tmp_path):
    with atomic_path(tmp_path / "case.h5") as tmp:
        assert is_part_file(tmp)  # the names atomic_path gives are the names looked for
        tmp.write_text("done")
    kept = ["case.h5", ".hidden.h5", "a.part.h5", ".x.h5.short.part.h5"]
    for name in kept[1:]:
        (tmp_path / name).write_text("mine")
    leftovers = [".case.h5.abcd_123.part.h5", ".train.txt.zz9zz9zz.part.txt", ".seg.nii.gz.q1w2e3r4.part.nii.gz"]
    for name in leftovers:
        (tmp_path / name).write_text("half")
    (tmp_path / ".dir.h5.abcdefgh.part.h5").mkdir()  # a folder is never removed
    assert remove_stale_parts(tmp_path, targets=["train.txt"]) == [tmp_path / ".train.txt.zz9zz9zz.part.txt"]
    removed = remove_stale_parts(tmp_path)
    assert sorted(p.name for p in removed) == sorted(set(leftovers) - {".train.txt.zz9zz9zz.part.txt"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, ".dir.h5.abcdefgh.part.h5"])
    assert remove_stale_parts(tmp_path / "missing") == []


def test_check_writable_accepts_a_new_file_in_folders_still_to_be_made(tmp_path):
    check_writable(tmp_path / "a" / "b" / "seg.nii.gz")
    check_writable(tmp_path / "new_folder", folder=True)
    assert list(tmp_path.iterdir()) == []  # the check leaves nothing behind


def test_check_writable_refuses_a_folder_as_file_and_a_file_as_folder(tmp_path):
    (tmp_path / "seg.nii.gz").mkdir()
    with pytest.raises(NotWritableError, match="seg.nii.gz: it is an existing folder"):
        check_writable(tmp_path / "seg.nii.gz")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotWritableError, match=r"file is a file, not a folder"):
        check_writable(tmp_path / "file" / "out.h5")


def test_check_writable_names_a_read_only_folder(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", read_only=True) as folder:
        with pytest.raises(NotWritableError) as info:
            check_writable(folder / "sub" / "seg.nii.gz")
        message = str(info.value)
        assert f"folder {folder} is not writable (read-only file system)" in message
        assert str(folder / "sub" / "seg.nii.gz") in message and "\n" not in message


def test_a_full_disk_error_names_the_target_not_the_temporary(tmp_path):
    with pytest.raises(OSError) as info, atomic_path(tmp_path / "seg.nii.gz") as tmp:
        tmp.write_bytes(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")  # as a writer that does not say where
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "seg.nii.gz")
    assert list(tmp_path.iterdir()) == []
