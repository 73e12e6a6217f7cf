"""Shared fixtures. ``code/`` is on the path through ``pyproject.toml`` (pytest ``pythonpath``)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# ``../shared`` beside the checkout; ``UGMCL_SHARED`` points elsewhere (e.g. a copy carried to a GPU machine)
SHARED = Path(os.environ.get("UGMCL_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "design" / "golden"
REAL_DATA = SHARED / "data" / "brats2018_samples"
REAL_LA = SHARED / "data" / "la2018_samples"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden values not found at {GOLDEN}")
    return GOLDEN


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real BraTS samples not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seven synthetic 36x36x34 cases (5 train, 1 val, 1 test) for short training runs."""
    from synthetic_h5 import write_synthetic_h5_dataset

    root = tmp_path_factory.mktemp("brats")
    write_synthetic_h5_dataset(root, n_cases=7, shape=(36, 36, 34), seed=3, n_val=1, n_test=1)
    return root


@pytest.fixture(scope="session")
def real_la_dir() -> Path:
    if not (REAL_LA / "train.list").is_file():
        pytest.skip(f"real Left Atrium samples not found at {REAL_LA}")
    return REAL_LA


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): tiny
    convolutions run fastest so, and several test workers share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def serve_folder(root: Path, handler: type = http.server.SimpleHTTPRequestHandler) -> Iterator[str]:
    """Serve ``root`` over HTTP on 127.0.0.1 (a free port) in a thread; yield the base URL. No test leaves the host."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str = "64k", read_only: bool = False) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (``mount -o size=``) at ``path`` for the block, read-only if asked; unmount after.

    A tiny one is a disk that fills up, a read-only one a folder nobody can write, whoever runs the tests.
    Skips the test where a tmpfs cannot be mounted (not root, no ``mount``, a container without the right).
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
