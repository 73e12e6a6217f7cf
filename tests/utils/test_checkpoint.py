"""Tests for utils/checkpoint.py: git blob ids, verified downloads from a local server, safe loading.

No test touches the internet: downloads come from an ``http.server`` on 127.0.0.1 serving a temp folder.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import serve_folder
from torch import nn

from utils.checkpoint import (
    PUBLISHED_CHECKPOINTS,
    CheckpointError,
    download_file,
    git_blob_id,
    load_state_dict_file,
    load_weights,
    published_checkpoint_path,
    published_checkpoint_url,
)

# ----------------------------------------------------------------------------------------------------------- helpers


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``/slow/...`` answers after 1 s, to test time-outs."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/slow/"):
            time.sleep(1.0)
        super().do_GET()

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up first (time-out test)
            pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(folder, base URL) of a local HTTP server serving that folder."""
    root = tmp_path / "www"
    root.mkdir()
    with serve_folder(root, _QuietHandler) as url:
        yield root, url


def _blob_id(data: bytes) -> str:
    """Independent reference: git's blob header, then SHA-1."""
    return hashlib.sha1(b"blob " + str(len(data)).encode("ascii") + b"\x00" + data).hexdigest()


def _tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Conv3d(1, 2, kernel_size=3).state_dict()


def _save(obj: object, path: Path) -> bytes:
    torch.save(obj, path)
    return path.read_bytes()


def _write(path: Path, data: bytes) -> bytes:
    path.write_bytes(data)
    return data


def _files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------------------- git_blob_id


def test_git_blob_id_of_hello_matches_the_hand_computed_value(tmp_path):
    expected = "ce013625030ba8dba906f756967f9e9ca394464a"  # `echo hello | git hash-object --stdin`
    assert git_blob_id(b"hello\n") == expected
    (tmp_path / "hello.txt").write_bytes(b"hello\n")
    assert git_blob_id(tmp_path / "hello.txt") == expected
    assert git_blob_id(str(tmp_path / "hello.txt")) == expected


def test_git_blob_id_of_empty_data_is_gits_empty_blob(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    assert git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_blob_id(tmp_path / "empty") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_blob_id_of_a_multi_chunk_file_matches_git_hash_object(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(2 * (1 << 20) + 12345))  # crosses the 1 MiB read boundary twice
    result = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True)
    assert git_blob_id(path) == result.stdout.strip()
    assert git_blob_id(path.read_bytes()) == result.stdout.strip()


def test_git_blob_id_of_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        git_blob_id(tmp_path / "nope.pth")


# ------------------------------------------------------------------------------------------------- published table


def test_published_checkpoints_are_the_ones_in_the_spec():
    root = "https://github.com/YichiZhang98/UG-MCL/raw/main/model"
    assert PUBLISHED_CHECKPOINTS == {
        25: (
            f"{root}/BraTs2019_UGMCL_25/unet_3D_dt/unet_3D_dt_best_model.pth",
            "64e6f4a77e70fd4648ce5d5f3b8879646c8aa98e",
        ),
        50: (
            f"{root}/BraTs2019_UGMCL_50/unet_3D_dt/unet_3D_dt_best_model.pth",
            "612c94b2cc16e64becc68c8da10de1c8ee4081cc",
        ),
    }


def test_published_checkpoint_path_follows_the_original_model_folder_layout(tmp_path):
    path = published_checkpoint_path(tmp_path, 25)
    assert path == tmp_path / "BraTs2019_UGMCL_25" / "unet_3D_dt" / "unet_3D_dt_best_model.pth"


def test_published_checkpoint_url_swaps_the_base_for_mirrors():
    assert published_checkpoint_url(50, "http://mirror/x/") == (
        "http://mirror/x/model/BraTs2019_UGMCL_50/unet_3D_dt/unet_3D_dt_best_model.pth"
    )
    with pytest.raises(ValueError, match="labeled_num=10"):
        published_checkpoint_url(10)


# ---------------------------------------------------------------------------------------------------- download_file


def test_download_of_a_matching_state_dict_lands_at_dest_and_loads(served, tmp_path):
    root, base = served
    state = _tiny_state()
    data = _save(state, root / "w.pth")
    dest = tmp_path / "out" / "sub" / "w.pth"
    got = download_file(f"{base}/w.pth", dest, expected_blob_id=_blob_id(data), progress=False)
    assert got == dest
    assert dest.read_bytes() == data
    assert _files_in(dest.parent) == ["w.pth"]  # no temporary file left beside it
    loaded = load_state_dict_file(dest)
    assert loaded.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(loaded[key], state[key], rtol=0, atol=0)


def test_download_accepts_an_upper_case_blob_id_and_no_blob_id(served, tmp_path):
    root, base = served
    data = _save(_tiny_state(), root / "w.pth")
    download_file(f"{base}/w.pth", tmp_path / "a.pth", expected_blob_id=_blob_id(data).upper(), progress=False)
    download_file(f"{base}/w.pth", tmp_path / "b.pth", expected_blob_id=None, progress=False)
    assert (tmp_path / "a.pth").read_bytes() == data == (tmp_path / "b.pth").read_bytes()


def test_tampered_download_is_rejected_by_blob_id_and_not_saved(served, tmp_path):
    root, base = served
    data = _save(_tiny_state(), root / "w.pth")
    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 0xFF
    (root / "w.pth").write_bytes(bytes(tampered))
    dest = tmp_path / "out" / "w.pth"
    with pytest.raises(CheckpointError, match=f"git blob id {_blob_id(bytes(tampered))}, expected {_blob_id(data)}"):
        download_file(f"{base}/w.pth", dest, expected_blob_id=_blob_id(data), progress=False)
    assert not dest.exists()
    assert _files_in(dest.parent) == []


def test_http_404_is_a_one_line_error_and_leaves_no_file(served, tmp_path):
    _, base = served
    (tmp_path / "model").mkdir()
    dest = tmp_path / "model" / "exp_25" / "unet_3D_dt" / "w.pth"
    with pytest.raises(CheckpointError, match="HTTP 404") as info:
        download_file(f"{base}/missing.pth", dest, progress=False)
    assert "\n" not in str(info.value)
    assert f"{base}/missing.pth" in str(info.value)
    assert _files_in(tmp_path / "model") == []  # the folders made for it are gone again, the one that was there stays


def test_unreachable_server_is_a_clear_error(tmp_path):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dest = tmp_path / "w.pth"
    with pytest.raises(CheckpointError, match="cannot reach the server"):
        download_file(f"http://127.0.0.1:{port}/w.pth", dest, progress=False, timeout=5)
    assert _files_in(tmp_path) == []


def test_slow_server_times_out_with_a_clear_error(served, tmp_path):
    root, base = served
    (root / "slow").mkdir()
    _save(_tiny_state(), root / "slow" / "w.pth")
    with pytest.raises(CheckpointError, match="0.2 s"):
        download_file(f"{base}/slow/w.pth", tmp_path / "w.pth", progress=False, timeout=0.2)
    assert _files_in(tmp_path) == ["www"]


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda path: _save([1, 2, 3], path), id="list"),
        pytest.param(lambda path: _save({"step": 3, "weight": torch.zeros(2)}, path), id="dict-with-an-int"),
        pytest.param(lambda path: _save({"student": _tiny_state(), "step": 3}, path), id="training-checkpoint"),
        pytest.param(lambda path: _save({}, path), id="empty-dict"),
        pytest.param(lambda path: _write(path, os.urandom(4096)), id="random-bytes"),
    ],
)
def test_download_that_is_not_a_plain_state_dict_is_rejected_even_with_a_matching_blob_id(served, tmp_path, payload):
    root, base = served
    data = payload(root / "w.pth")
    dest = tmp_path / "out" / "w.pth"
    with pytest.raises(CheckpointError, match="w.pth"):
        download_file(f"{base}/w.pth", dest, expected_blob_id=_blob_id(data), progress=False)
    assert _files_in(dest.parent) == []


def test_failed_download_leaves_an_existing_file_untouched(served, tmp_path):
    _, base = served
    dest = tmp_path / "w.pth"
    dest.write_bytes(b"previous")
    with pytest.raises(CheckpointError):
        download_file(f"{base}/missing.pth", dest, progress=False)
    assert dest.read_bytes() == b"previous"
    assert _files_in(tmp_path) == ["w.pth", "www"]


def test_download_from_a_file_url_works(tmp_path):
    data = _save(_tiny_state(), tmp_path / "src.pth")
    dest = tmp_path / "out" / "w.pth"
    download_file((tmp_path / "src.pth").as_uri(), dest, expected_blob_id=_blob_id(data), progress=False)
    assert dest.read_bytes() == data


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"url": "ftp://host/w.pth"}, "ftp"),
        ({"url": "http://127.0.0.1:1/w.pth", "expected_blob_id": "abc"}, "40 hexadecimal"),
    ],
)
def test_download_rejects_bad_arguments_before_connecting(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        download_file(dest=tmp_path / "w.pth", progress=False, **kwargs)
    assert _files_in(tmp_path) == []


# --------------------------------------------------------------------------------------------- load_state_dict_file


def test_missing_file_is_a_checkpoint_error_and_file_not_found_naming_the_path(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="nope.pth"):
        load_state_dict_file(path)
    with pytest.raises(FileNotFoundError):
        load_state_dict_file(path)


@pytest.mark.parametrize(
    "content",
    [b"", os.urandom(2048), b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n"],
    ids=["empty", "random", "lfs-pointer"],
)
def test_corrupt_file_is_a_one_line_error_naming_the_path(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pth") as info:
        load_state_dict_file(path)
    assert "\n" not in str(info.value)


def test_truncated_checkpoint_is_an_error(tmp_path):
    path = tmp_path / "cut.pth"
    data = _save(_tiny_state(), path)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth"):
        load_state_dict_file(path)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "was_run"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_state_dict_file(path)
    assert not marker.exists()


@pytest.mark.parametrize("key", ["student", "state_dict", "model"])
def test_training_checkpoint_yields_the_wrapped_state_dict(tmp_path, key):
    state = _tiny_state()
    path = tmp_path / "ckpt.pth"
    torch.save({key: state, "step": 7, "optimizer": {"state": {}, "param_groups": []}}, path)
    loaded = load_state_dict_file(path)
    assert sorted(loaded) == sorted(state)
    torch.testing.assert_close(loaded["weight"], state["weight"], rtol=0, atol=0)


def test_student_is_preferred_over_other_wrapped_weights(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "student": {"b": torch.ones(1)}}, path)
    assert list(load_state_dict_file(path)) == ["b"]


def test_dict_without_weights_is_an_error_listing_its_keys(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"step": 7, "lr": 0.01}, path)
    with pytest.raises(CheckpointError, match="lr, step"):
        load_state_dict_file(path)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefix_is_stripped(tmp_path, prefix):
    state = _tiny_state()
    path = tmp_path / "ddp.pth"
    torch.save({"student": {prefix + k: v for k, v in state.items()}}, path)
    assert sorted(load_state_dict_file(path)) == ["bias", "weight"]


def test_prefix_on_only_some_keys_is_kept(tmp_path):
    path = tmp_path / "mixed.pth"
    torch.save({"module.a": torch.zeros(1), "b": torch.zeros(1)}, path)
    assert sorted(load_state_dict_file(path)) == ["b", "module.a"]


# ----------------------------------------------------------------------------------------------------- load_weights


class _Net(nn.Module):
    def __init__(self, out_channels: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, out_channels, kernel_size=3)
        self.final = nn.Conv3d(out_channels, 1, kernel_size=1)


def _filled(net: nn.Module, value: float) -> nn.Module:
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)
    return net


def test_load_weights_from_a_ddp_file_fills_the_network(tmp_path):
    source = _filled(_Net(), 0.5)
    path = tmp_path / "w.pth"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)
    net = _filled(_Net(), 0.0)
    load_weights(net, path)
    assert all(torch.equal(p, torch.full_like(p, 0.5)) for p in net.parameters())


def test_load_weights_accepts_a_state_dict_in_memory():
    net = _filled(_Net(), 0.0)
    load_weights(net, {"student": _filled(_Net(), 2.0).state_dict()})
    assert torch.equal(net.final.bias, torch.tensor([2.0]))


def test_mismatch_names_missing_and_unexpected_keys_and_leaves_the_network_unchanged(tmp_path):
    state = _filled(_Net(), 1.0).state_dict()
    del state["final.bias"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    net = _filled(_Net(), 0.0)
    with pytest.raises(CheckpointError) as info:
        load_weights(net, path)
    message = str(info.value)
    assert str(path) in message
    assert "1 missing key(s): final.bias" in message
    assert "1 unexpected key(s): extra.weight" in message
    assert "\n" not in message
    assert all(torch.equal(p, torch.zeros_like(p)) for p in net.parameters())


def test_shape_mismatch_names_both_shapes_even_when_not_strict():
    state = _Net(out_channels=3).state_dict()
    net = _Net(out_channels=2)
    with pytest.raises(CheckpointError, match=r"conv\.weight: checkpoint \(3, 1, 3, 3, 3\) vs model \(2, 1, 3, 3, 3\)"):
        load_weights(net, state, strict=False)


def test_not_strict_loads_the_common_keys_and_reports_the_rest():
    state = _filled(_Net(), 3.0).state_dict()
    del state["final.weight"]
    net = _filled(_Net(), 0.0)
    result = load_weights(net, state, strict=False)
    assert result.missing_keys == ["final.weight"]
    assert torch.equal(net.final.bias, torch.tensor([3.0]))
    assert torch.equal(net.final.weight, torch.zeros_like(net.final.weight))


def test_long_key_lists_are_cut_to_the_first_few():
    net = nn.Sequential(*[nn.Linear(1, 1) for _ in range(8)])  # 16 keys
    with pytest.raises(
        CheckpointError,
        match=r"16 missing key\(s\): 0\.weight, 0\.bias, 1\.weight, 1\.bias, 2\.weight "
        r"\.\.\. and 11 more",
    ):
        load_weights(net, {"other": torch.zeros(1)})
