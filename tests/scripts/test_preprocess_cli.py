"""Tests of code/preprocess_brats2019.py: in-process through ``main([...])`` and once as a real subprocess."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from conftest import mounted_tmpfs

import preprocess_brats2019
from dataloaders.preprocess import SPLIT_MANIFEST, is_valid_h5, read_case_h5

CODE_DIR = Path(preprocess_brats2019.__file__).resolve().parent
SHAPE = (24, 22, 20)
AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_case(root: Path, name: str, seed: int, corrupt_flair: bool = False) -> None:
    """A tiny BraTS-like case: ellipsoid brain (int16, background 0) and a tumour blob labelled 1/2/4."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    c = np.asarray(SHAPE) / 2.0
    brain = ((x - c[0]) / 9) ** 2 + ((y - c[1]) / 8) ** 2 + ((z - c[2]) / 7) ** 2 <= 1
    r = np.sqrt((x - c[0] - 2) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
    seg = np.select([r <= 1.5, r <= 2.5, r <= 4], [1, 4, 2], 0).astype(np.int16)
    flair = rng.integers(100, 500, size=SHAPE).astype(np.int16)
    flair[~brain] = 0
    folder = root / name
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(flair, AFFINE), folder / f"{name}_flair.nii.gz")
    nib.save(nib.Nifti1Image(seg, AFFINE), folder / f"{name}_seg.nii.gz")
    if corrupt_flair:
        (folder / f"{name}_flair.nii.gz").write_bytes(b"\x1f\x8b truncated")


@pytest.fixture()
def raw(tmp_path) -> Path:
    """Four good cases in the release layout (HGG/LGG)."""
    root = tmp_path / "MICCAI_BraTS_2019_Data_Training"
    for i, name in enumerate(["BraTS19_A_1", "BraTS19_B_1", "BraTS19_C_1"]):
        write_case(root / "HGG", name, seed=i)
    write_case(root / "LGG", "BraTS19_D_1", seed=3)
    return root


def read_lists(out: Path) -> dict[str, list[str]]:
    return {s: (out / f"{s}.txt").read_text().splitlines() for s in ("train", "val", "test")}


def test_writes_one_h5_per_case_and_split_lists(raw, tmp_path, capsys):
    out = tmp_path / "out"
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out)]) == 0
    names = ["BraTS19_A_1", "BraTS19_B_1", "BraTS19_C_1", "BraTS19_D_1"]
    assert sorted(p.name for p in (out / "data").iterdir()) == [f"{n}.h5" for n in names]
    assert all(is_valid_h5(out / "data" / f"{n}.h5") for n in names)
    lists = read_lists(out)
    assert [len(lists[s]) for s in ("train", "val", "test")] == [2, 1, 1]  # round(4 * 25/335) = 0 -> 1
    assert sorted(lists["train"] + lists["val"] + lists["test"]) == names
    assert "4 written, 0 skipped" in capsys.readouterr().out


def test_rerun_skips_done_cases_and_keeps_the_split(raw, tmp_path, capsys):
    out = tmp_path / "out"
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out)]) == 0
    lists = read_lists(out)
    stamp = (out / "data" / "BraTS19_A_1.h5").stat().st_mtime_ns
    capsys.readouterr()
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out), "--seed", "7"]) == 0
    assert "0 written, 4 skipped" in capsys.readouterr().out
    assert (out / "data" / "BraTS19_A_1.h5").stat().st_mtime_ns == stamp
    assert read_lists(out) == lists  # existing lists win over a new seed
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out), "--overwrite"]) == 0
    assert "4 written, 0 skipped" in capsys.readouterr().out


def test_a_bad_case_is_reported_skipped_and_fails_the_run(raw, tmp_path, capsys):
    write_case(raw / "LGG", "BraTS19_Bad_1", seed=9, corrupt_flair=True)
    out = tmp_path / "out"
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "BraTS19_Bad_1: cannot read BraTS19_Bad_1_flair.nii.gz" in err
    assert "1 case(s) failed" in err
    files = sorted(p.name for p in (out / "data").iterdir())
    assert files == ["BraTS19_A_1.h5", "BraTS19_B_1.h5", "BraTS19_C_1.h5", "BraTS19_D_1.h5"]  # nothing for the bad one
    assert "BraTS19_Bad_1" not in sum(read_lists(out).values(), [])


def test_strict_stops_at_the_first_bad_case(raw, tmp_path, capsys):
    write_case(raw / "HGG", "BraTS19_0Bad_1", seed=9, corrupt_flair=True)  # sorts first
    out = tmp_path / "out"
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out), "--strict"]) == 1
    assert "BraTS19_0Bad_1: cannot read" in capsys.readouterr().err
    assert list((out / "data").iterdir()) == []
    assert not (out / "train.txt").exists()


def test_options_reach_the_files_and_workers_give_the_same_result(raw, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--raw_dir", str(raw), "--label_mode", "multiclass", "--spacing", "2"]
    assert preprocess_brats2019.main([*common, "--out_dir", str(one)]) == 0
    assert preprocess_brats2019.main([*common, "--out_dir", str(two), "--workers", "2"]) == 0
    for name in ["BraTS19_A_1", "BraTS19_D_1"]:
        image1, label1, attrs = read_case_h5(one / "data" / f"{name}.h5")
        image2, label2, _ = read_case_h5(two / "data" / f"{name}.h5")
        np.testing.assert_array_equal(image1, image2)
        np.testing.assert_array_equal(label1, label2)
        assert attrs["label_mode"] == "multiclass" and attrs["target_spacing"] == 2.0
        assert set(np.unique(label1)) <= {0, 1, 2, 3} and 3 in label1
    assert read_lists(one) == read_lists(two)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "--workers must be >= 1"),
        (["--modalities", "dwi"], "invalid choice"),
        (["--spacing", "-1"], "spacing must be a positive number"),
    ],
)
def test_bad_arguments_exit_with_2(raw, tmp_path, capsys, args, message):
    argv = ["--raw_dir", str(raw), "--out_dir", str(tmp_path / "out"), *args]
    try:
        code = preprocess_brats2019.main(argv)
    except SystemExit as exit_:  # argparse errors exit directly
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_or_empty_raw_dir_exits_with_2(tmp_path, capsys):
    assert preprocess_brats2019.main(["--raw_dir", str(tmp_path / "none"), "--out_dir", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert preprocess_brats2019.main(["--raw_dir", str(tmp_path / "empty"), "--out_dir", str(tmp_path / "o")]) == 2
    assert "no case folders" in capsys.readouterr().err


def test_script_exits_nonzero_for_a_failing_case(tmp_path):
    raw = tmp_path / "raw"
    write_case(raw, "BraTS19_A_1", seed=0)
    write_case(raw, "BraTS19_Bad_1", seed=1, corrupt_flair=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "preprocess_brats2019.py", "--raw_dir", str(raw), "--out_dir", str(tmp_path / "out")],
        cwd=CODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "BraTS19_Bad_1: cannot read BraTS19_Bad_1_flair.nii.gz" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "data").iterdir()) == ["BraTS19_A_1.h5"]


# ------------------------------------------------------------------------------ issue #21: nothing is ever lost


def error_lines(err: str) -> list[str]:
    """The ``error:`` lines of a captured stderr (tqdm's carriage returns split too)."""
    return [line for line in re.split(r"[\r\n]", err) if line.startswith("error:")]


def no_env_pythonpath() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_rerun_after_fixing_a_failed_case_puts_it_in_the_split(raw, tmp_path, capsys):
    write_case(raw / "LGG", "BraTS19_E_1", seed=9, corrupt_flair=True)
    out = tmp_path / "out"
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out)]) == 1
    assert "BraTS19_E_1" not in sum(read_lists(out).values(), [])
    shutil.rmtree(raw / "LGG" / "BraTS19_E_1")
    write_case(raw / "LGG", "BraTS19_E_1", seed=9)  # fixed
    capsys.readouterr()
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out)]) == 0
    lists = read_lists(out)
    names = ["BraTS19_A_1", "BraTS19_B_1", "BraTS19_C_1", "BraTS19_D_1", "BraTS19_E_1"]
    assert sorted(sum(lists.values(), [])) == names
    assert "added: BraTS19_E_1" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(fresh)]) == 0
    assert read_lists(fresh) == lists  # the same split as a run in which nothing had failed


def test_split_lists_the_user_supplied_are_never_changed(raw, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mine = {"train": ["BraTS19_B_1", "BraTS19_A_1"], "val": ["BraTS19_C_1"], "test": ["BraTS19_D_1"]}
    for split, names in mine.items():
        (out / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    write_case(raw / "LGG", "BraTS19_E_1", seed=9)  # a case the user's split does not know
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out)]) == 0
    assert read_lists(out) == mine
    assert not (out / SPLIT_MANIFEST).exists()


def test_a_full_disk_stops_with_one_line_naming_the_case_and_no_partial_file(raw, tmp_path, monkeypatch, capsys):
    real_write = os.write
    files: set[int] = set()

    def disk_full_after_one_file(fd: int, data: bytes) -> int:
        if fd <= 2:
            return real_write(fd, data)
        inode = os.fstat(fd).st_ino
        if not files or inode in files:
            files.add(inode)
            return real_write(fd, data)
        real_write(fd, bytes(data)[: len(data) // 2])  # half of the second file lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full_after_one_file)
    out = tmp_path / "out"
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out)]) == 1
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert "BraTS19_B_1: no space left on device" in line and str(out / "data" / "BraTS19_B_1.h5") in line
    assert "Traceback" not in err and "FAILED" not in err  # stopped at once, not one failure per case
    assert sorted(p.name for p in (out / "data").iterdir()) == ["BraTS19_A_1.h5"]  # no partial file, no temporary
    assert is_valid_h5(out / "data" / "BraTS19_A_1.h5")
    assert sorted(p.name for p in out.iterdir()) == ["data"]  # no split lists from an interrupted run


def test_a_full_tmpfs_gives_one_line_not_an_hdf5_crash(tmp_path):
    raw = tmp_path / "raw"
    for i, name in enumerate(["BraTS19_A_1", "BraTS19_B_1", "BraTS19_C_1"]):
        write_case(raw, name, seed=i)
    with mounted_tmpfs(tmp_path / "disk", size="36k") as disk:  # room for about one 20 kB case file
        out = disk / "out"
        proc = subprocess.run(
            [sys.executable, "preprocess_brats2019.py", "--raw_dir", str(raw), "--out_dir", str(out)],
            cwd=CODE_DIR,
            env=no_env_pythonpath(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 1, proc.stderr  # the released writer crashed with a segfault here (rc 139)
        [line] = error_lines(proc.stderr)
        assert re.search(r"BraTS19_[ABC]_1: no space left on device", line)
        assert "Traceback" not in proc.stderr and "HDF5" not in proc.stderr
        left = sorted((out / "data").iterdir())
        assert all(not p.name.startswith(".") and is_valid_h5(p) for p in left)


@contextlib.contextmanager
def read_only_folder(tmp_path: Path, how: str):
    folder = tmp_path / "read_only"
    if how == "mount":
        with mounted_tmpfs(folder, read_only=True):
            yield folder
        return
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("permission bits do not stop this user (root)")
        yield folder
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("how", ["chmod", "mount"])
@pytest.mark.parametrize("below", [False, True], ids=["out_dir", "parent_of_out_dir"])
def test_a_read_only_output_folder_gives_one_line_naming_it(raw, tmp_path, capsys, how, below):
    with read_only_folder(tmp_path, how) as folder:
        out = folder / "BraTS2019" if below else folder
        assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out)]) == 1
        err = capsys.readouterr().err
        [line] = error_lines(err)
        assert f"folder {folder} is not writable" in line
        assert "Traceback" not in err
        assert list(folder.iterdir()) == []


def test_stale_temporary_files_of_a_killed_run_are_removed_and_not_taken_for_done_cases(raw, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    stale_case = out / "data" / ".BraTS19_A_1.h5.k1ll3d_0.part.h5"  # atomic_path's name for BraTS19_A_1.h5
    with h5py.File(stale_case, "w") as f:  # even a complete-looking one is not a finished case
        f.create_dataset("image", data=np.zeros((2, 2, 2), np.float32))
        f.create_dataset("label", data=np.zeros((2, 2, 2), np.uint8))
    stale_list = out / ".train.txt.k1ll3d_1.part.txt"
    stale_list.write_text("BraTS19_A_1\n")
    mine = out / "data" / ".notes.h5"  # hidden, but not named like a temporary file: not ours to remove
    mine.write_text("keep me")
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out)]) == 0
    captured = capsys.readouterr()
    assert "removed 2 unfinished temporary file(s)" in captured.err
    assert not stale_case.exists() and not stale_list.exists()
    assert mine.read_text() == "keep me"
    assert "4 written, 0 skipped" in captured.out
    assert is_valid_h5(out / "data" / "BraTS19_A_1.h5")


def test_a_second_run_into_the_same_folder_is_refused(raw, tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")
    data = tmp_path / "out" / "data"
    data.mkdir(parents=True)
    fd = os.open(data, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a run in progress holds it
        code = preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(tmp_path / "out")])
    finally:
        os.close(fd)
    assert code == 1
    [line] = error_lines(capsys.readouterr().err)
    assert f"another preprocess_brats2019.py run is writing into {data}" in line
    assert list(data.iterdir()) == []


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from ``/proc/<id>/stat``: the field after the command name)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process parents from Linux /proc")
def test_worker_processes_end_when_the_parent_is_killed(tmp_path):
    raw = tmp_path / "raw"
    for i in range(8):
        write_case(raw, f"BraTS19_K{i}_1", seed=i)
    proc = subprocess.Popen(
        [sys.executable, "preprocess_brats2019.py", "--raw_dir", str(raw), "--out_dir", str(tmp_path / "out")]
        + ["--workers", "2"],
        cwd=CODE_DIR,
        env=no_env_pythonpath(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    children: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            children = _children(proc.pid)
            if sum("spawn_main" in _cmdline(pid) for pid in children) == 2:
                break
            time.sleep(0.02)
        assert sum("spawn_main" in _cmdline(pid) for pid in children) == 2, "the two workers never started"
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(map(_alive, children)):
            time.sleep(0.05)
        assert [pid for pid in children if _alive(pid)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children:  # a failed check must not leave them running
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_ctrl_c_is_one_line_and_keeps_the_finished_cases(raw, tmp_path, monkeypatch, capsys):
    real = preprocess_brats2019.try_process_case

    def interrupted_at_the_second(case, *args):
        if case.name == "BraTS19_B_1":
            raise KeyboardInterrupt
        return real(case, *args)

    monkeypatch.setattr(preprocess_brats2019, "try_process_case", interrupted_at_the_second)
    out = tmp_path / "out"
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted: the finished cases are kept" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "data").iterdir()) == ["BraTS19_A_1.h5"]


def test_an_out_dir_that_is_a_file_is_one_line(raw, tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    assert preprocess_brats2019.main(["--raw_dir", str(raw), "--out_dir", str(tmp_path / "out")]) == 1
    [line] = error_lines(capsys.readouterr().err)
    assert line == f"error: cannot write output folder {tmp_path / 'out'}: {tmp_path / 'out'} is a file, not a folder"
    assert (tmp_path / "out").read_text() == "not a folder"
