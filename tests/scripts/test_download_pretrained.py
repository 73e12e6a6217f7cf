"""Tests for code/download_pretrained.py against a local HTTP server laid out like the original repository."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import mounted_tmpfs, serve_folder
from torch import nn

from download_pretrained import main

CODE = Path(__file__).resolve().parents[2] / "code"
RELATIVE = "model/BraTs2019_UGMCL_{n}/unet_3D_dt/unet_3D_dt_best_model.pth"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(folder, base URL) of a local HTTP server; files go under ``folder/model/...`` as in the repository."""
    root = tmp_path / "mirror"
    root.mkdir()
    with serve_folder(root, _QuietHandler) as url:
        yield root, url


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob " + str(len(data)).encode("ascii") + b"\x00" + data).hexdigest()


def _publish(root: Path, labeled_num: int, seed: int = 0) -> bytes:
    """Put a tiny plain state_dict where the repository keeps the ``labeled_num`` model; return its bytes."""
    path = root / RELATIVE.format(n=labeled_num)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.save(nn.Conv3d(1, 2, kernel_size=3).state_dict(), path)
    return path.read_bytes()


def _final(out_dir: Path, labeled_num: int) -> Path:
    return out_dir / f"BraTs2019_UGMCL_{labeled_num}" / "unet_3D_dt" / "unet_3D_dt_best_model.pth"


def _args(base: str, out_dir: Path, labeled_num: int = 25, blob_id: str | None = None, *extra: str) -> list[str]:
    argv = ["--labeled_num", str(labeled_num), "--base_url", base, "--out_dir", str(out_dir), "--no_progress"]
    if blob_id is not None:
        argv += ["--expected_blob_id", blob_id]
    return argv + list(extra)


def test_download_succeeds_prints_the_path_and_loads(mirror, tmp_path, capsys):
    root, base = mirror
    data = _publish(root, 25)
    out = tmp_path / "model"
    assert main(_args(base, out, 25, _blob_id(data))) == 0
    final = _final(out, 25)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(final)
    assert final.read_bytes() == data
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]
    assert sorted(torch.load(final, weights_only=True)) == ["bias", "weight"]


def test_verified_file_is_kept_without_contacting_the_server(mirror, tmp_path, capsys):
    root, base = mirror
    data = _publish(root, 25)
    out = tmp_path / "model"
    assert main(_args(base, out, 25, _blob_id(data))) == 0
    (root / RELATIVE.format(n=25)).unlink()  # a second download would now fail with 404
    assert main(_args(base, out, 25, _blob_id(data))) == 0
    captured = capsys.readouterr()
    assert "already present and verified" in captured.err
    assert captured.out.strip().splitlines()[-1] == str(_final(out, 25))


def test_force_downloads_again_and_a_failed_forced_download_keeps_the_verified_file(mirror, tmp_path, capsys):
    root, base = mirror
    data = _publish(root, 25)
    out = tmp_path / "model"
    assert main(_args(base, out, 25, _blob_id(data))) == 0
    (root / RELATIVE.format(n=25)).unlink()
    assert main(_args(base, out, 25, _blob_id(data), "--force")) == 1  # it really went to the server: 404
    assert "HTTP 404" in capsys.readouterr().err
    assert _final(out, 25).read_bytes() == data


def test_a_present_file_that_does_not_verify_is_replaced_only_with_force(mirror, tmp_path, capsys):
    root, base = mirror
    data = _publish(root, 50)
    final = _final(tmp_path / "model", 50)
    final.parent.mkdir(parents=True)
    final.write_bytes(b"half a download")
    assert main(_args(base, tmp_path / "model", 50, _blob_id(data))) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {final} exists and is not the requested checkpoint") and "--force" in line
    assert final.read_bytes() == b"half a download"
    assert main(_args(base, tmp_path / "model", 50, _blob_id(data), "--force")) == 0
    assert final.read_bytes() == data


def _unreachable_url() -> str:
    """An http URL on this host where nothing listens: the connection is refused at once, as with no network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/UG-MCL"


def _trained_model(out_dir: Path, labeled_num: int) -> bytes:
    """What training saves at the published path: a state_dict that is not the published file."""
    final = _final(out_dir, labeled_num)
    final.parent.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(nn.Conv3d(1, 2, kernel_size=3).state_dict(), final)
    return final.read_bytes()


def test_a_trained_model_is_never_removed_for_a_download_that_fails(tmp_path, capsys):
    out = tmp_path / "model"
    trained = _trained_model(out, 25)
    final = _final(out, 25)
    assert main(_args(_unreachable_url(), out, 25)) == 1  # the published blob id, as a user runs it
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {final} exists and is not the published checkpoint (git blob id ")
    assert "expected 64e6f4a77e70fd4648ce5d5f3b8879646c8aa98e" in line and "--force" in line
    assert final.read_bytes() == trained
    assert main(_args(_unreachable_url(), out, 25, None, "--force")) == 1  # asked to replace it, but no network
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: download of ") and "cannot reach the server" in err[-1]
    assert final.read_bytes() == trained
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]  # no temporary file left either


def test_a_folder_at_the_checkpoint_path_is_one_line(mirror, tmp_path, capsys):
    root, base = mirror
    data = _publish(root, 25)
    final = _final(tmp_path / "model", 25)
    final.mkdir(parents=True)
    assert main(_args(base, tmp_path / "model", 25, _blob_id(data), "--force")) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: {final} is a folder; expected the checkpoint file there (or nothing)"
    assert final.is_dir()


def test_the_published_blob_id_is_required_by_default(mirror, tmp_path, capsys):
    root, base = mirror
    _publish(root, 25)  # a valid state_dict, but not the published file
    assert main(_args(base, tmp_path / "model", 25)) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("error: ")
    assert "expected 64e6f4a77e70fd4648ce5d5f3b8879646c8aa98e" in err
    assert not _final(tmp_path / "model", 25).exists()


def test_wrong_blob_id_fails_with_one_line_and_no_file(mirror, tmp_path, capsys):
    root, base = mirror
    data = _publish(root, 25)
    assert main(_args(base, tmp_path / "model", 25, _blob_id(data + b"x"))) == 1
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert err_lines[-1].startswith("error: ") and "git blob id" in err_lines[-1]
    assert not (tmp_path / "model").exists()  # no file, and no empty folders made for it either


def test_missing_file_on_the_server_fails_with_exit_1(mirror, tmp_path, capsys):
    _, base = mirror
    assert main(_args(base, tmp_path / "model", 50, "0" * 40)) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert not _final(tmp_path / "model", 50).exists()


def test_a_local_folder_works_as_base_url(tmp_path):
    root = tmp_path / "clone"
    data = _publish(root, 50)
    assert main(_args(str(root), tmp_path / "model", 50, _blob_id(data))) == 0
    assert _final(tmp_path / "model", 50).read_bytes() == data


@pytest.mark.parametrize(
    "argv",
    [
        ["--labeled_num", "10"],
        [],
        ["--labeled_num", "25", "--expected_blob_id", "not-hex"],
    ],
    ids=["unpublished-labeled-num", "no-labeled-num", "bad-blob-id"],
)
def test_bad_arguments_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_help_documents_the_mirror_options(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--base_url" in out and "--expected_blob_id" in out and "mirror" in out


def test_runs_as_a_script_from_the_code_folder(mirror, tmp_path):
    root, base = mirror
    data = _publish(root, 25)
    out = tmp_path / "model"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "download_pretrained.py", *_args(base, out, 25, _blob_id(data))],
        cwd=CODE,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(_final(out, 25))
    assert _final(out, 25).read_bytes() == data


def test_a_read_only_model_folder_is_one_line_before_downloading(mirror, tmp_path, capsys):
    root, base = mirror
    data = _publish(root, 25)
    with mounted_tmpfs(tmp_path / "ro", read_only=True) as folder:
        assert main(_args(base, folder / "model", 25, _blob_id(data))) == 1
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line == (
            f"error: cannot write output file {_final(folder / 'model', 25)}: folder {folder} is not writable "
            "(read-only file system)"
        )
