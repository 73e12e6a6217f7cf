"""Shared fixtures. ``code/`` is on the path through ``pyproject.toml`` (pytest ``pythonpath``)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
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
