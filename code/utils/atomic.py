"""Atomic file writes: write to a temporary file beside the target, then rename.

An interrupted run never leaves a half-written output at the final path. The temporary file is
``.<target name>.<8 random characters>.part<suffix>`` in the target's folder (hidden, and never named like a
finished output); :func:`remove_stale_parts` removes the ones a killed run left behind. :func:`check_writable`
tells, before any long computation, whether an output can be written at all.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "NotWritableError",
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_writable",
    "is_no_space_error",
    "is_part_file",
    "remove_stale_parts",
]

# ".<target>.<mkstemp's 8 characters: a-z, 0-9, _>.part<suffix>", as atomic_path names its temporaries
_PART_RE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.part(?:\..*)?$")
_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class NotWritableError(OSError):
    """An output path cannot be written; the message is one line naming the path and the reason."""


@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it onto ``path``.

    The temporary name keeps the target's suffix (``.nii.gz``, ``.h5`` ...) unless ``suffix`` is
    given, so writers that look at the extension behave. On any exception the temporary file is
    removed and the target is left untouched; a full disk raises ``OSError(errno.ENOSPC, ..., str(path))``,
    naming the target.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes 0600 files; give the output the usual umask-based mode
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as err:
        if is_no_space_error(err):  # name the output, not the hidden temporary file (or nothing, as some writers)
            raise OSError(err.errno, "No space left on device", str(path)) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: PathLike, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` atomically, with plain ``os.write`` calls.

    A failing write (a full disk: ``OSError`` with ``errno.ENOSPC``) raises that ``OSError`` and leaves no
    temporary file behind; ``path`` keeps its previous content, or stays absent.
    """
    view = memoryview(data).cast("B")
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_BINARY", 0))
        try:
            written = 0
            while written < view.nbytes:  # os.write may write less than asked
                written += os.write(fd, view[written:])
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def is_part_file(path: PathLike) -> bool:
    """Whether ``path`` is named like a temporary file of :func:`atomic_path` (``.<name>.XXXXXXXX.part<suffix>``)."""
    return _PART_RE.match(Path(path).name) is not None


def remove_stale_parts(folder: PathLike, targets: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporary files that an interrupted :func:`atomic_path` left in ``folder``.

    A run killed with SIGKILL (or by a power cut) cannot remove its ``.<name>.XXXXXXXX.part<suffix>`` file. Call
    this at the start of a run that writes into ``folder`` and that no other process writes into at the same time
    (the temporary file of a running writer would be removed too, and its rename would then fail).

    Args:
        folder: the folder to clean (not recursive); a missing folder holds nothing to remove.
        targets: only remove the temporaries of these target file names (e.g. ``["model.pth"]``); all by default.

    Returns:
        The removed files, sorted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None if targets is None else set(targets)
    removed = []
    for entry in sorted(folder.iterdir()):
        match = _PART_RE.match(entry.name)
        if match is None or (wanted is not None and match["target"] not in wanted) or not entry.is_file():
            continue
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed.append(entry)
    return removed


def check_writable(path: PathLike, *, folder: bool = False) -> None:
    """Check that ``path`` could be written now, before a long computation produces what goes there.

    The folder that would receive the file (``path``'s parent, or ``path`` itself with ``folder=True``) must be a
    folder we can create a file in; when it does not exist yet, the nearest existing parent must be one (the
    missing folders would be made there). The check creates and removes an empty temporary file there, so it
    sees read-only file systems and access rules that the permission bits do not show.

    Args:
        path: the output file, or with ``folder=True`` the output folder.
        folder: whether ``path`` is a folder to write files into.

    Raises:
        NotWritableError: naming ``path``, the folder that refused, and why (e.g. "read-only file system",
            "permission denied", "is a file, not a folder").
    """
    target = Path(path)
    kind = "folder" if folder else "file"
    if not folder and target.is_dir():
        raise NotWritableError(f"cannot write output file {target}: it is an existing folder")
    where = target if folder else target.parent
    existing = where
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise NotWritableError(f"cannot write output {kind} {target}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".part.tmp", dir=existing)
    except OSError as err:
        reason = (err.strerror or type(err).__name__).lower()
        raise NotWritableError(
            f"cannot write output {kind} {target}: folder {existing} is not writable ({reason})"
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def is_no_space_error(err: BaseException) -> bool:
    """Whether ``err`` is an ``OSError`` for a full disk or an exhausted quota (``ENOSPC``, ``EDQUOT``)."""
    return isinstance(err, OSError) and err.errno in _NO_SPACE
