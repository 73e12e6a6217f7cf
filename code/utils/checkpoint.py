"""Checkpoints: download the published UG-MCL weights with a hash check, and load weights safely.

The published ``unet_3D_dt`` weights are plain git blobs in the original repository (SPEC section 2), so the
git blob id is the checksum: ``sha1(b"blob <size>\\0" + bytes)``, the value ``git hash-object`` prints.
A download is written to a temporary file beside its target, checked (blob id, then "is a plain
``state_dict``") and only then renamed into place, so a failed or tampered download never leaves a file at
the final path.

Every load goes through ``torch.load(weights_only=True)``: a checkpoint is data, and a pickle that tries to
build arbitrary objects (the released code's ``torch.load`` ran any such pickle) is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn
from tqdm import tqdm

from utils.atomic import atomic_path

PathLike = Union[str, "os.PathLike[str]"]
StateDict = dict[str, torch.Tensor]

__all__ = [
    "PUBLISHED_BASE_URL",
    "PUBLISHED_CHECKPOINTS",
    "CheckpointError",
    "CheckpointNotFoundError",
    "download_file",
    "git_blob_id",
    "load_state_dict_file",
    "load_weights",
    "published_checkpoint_path",
    "published_checkpoint_url",
    "published_relative_path",
]

PUBLISHED_BASE_URL = "https://github.com/YichiZhang98/UG-MCL/raw/main"
"""Prefix of the raw-file URLs of the original repository; mirrors replace it (``--base_url``)."""

_PUBLISHED_BLOB_IDS = {
    25: "64e6f4a77e70fd4648ce5d5f3b8879646c8aa98e",
    50: "612c94b2cc16e64becc68c8da10de1c8ee4081cc",
}

_CHUNK = 1 << 20  # 1 MiB reads: streaming keeps memory flat for any file size
_SHOWN_KEYS = 5  # how many keys of each kind a mismatch message lists
_WRAPPER_KEYS = ("student", "state_dict", "model")  # where training checkpoints keep the weights, in lookup order
_PREFIXES = ("module.", "_orig_mod.")  # added by DistributedDataParallel / DataParallel and by torch.compile
_BLOB_ID_RE = re.compile(r"[0-9a-f]{40}")


class CheckpointError(RuntimeError):
    """A checkpoint could not be downloaded, verified or loaded; the message is one line naming the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also a ``FileNotFoundError``)."""


def published_relative_path(labeled_num: int) -> str:
    """Path of a published checkpoint inside the original repository.

    ``model/BraTs2019_UGMCL_{labeled_num}/unet_3D_dt/unet_3D_dt_best_model.pth``: the same under every mirror.
    """
    return f"model/BraTs2019_UGMCL_{labeled_num}/unet_3D_dt/unet_3D_dt_best_model.pth"


def published_checkpoint_url(labeled_num: int, base_url: str = PUBLISHED_BASE_URL) -> str:
    """Raw-file URL of the published checkpoint trained with ``labeled_num`` labelled cases.

    Args:
        labeled_num: 25 or 50, the two published models.
        base_url: repository root that the relative path is appended to; the original repository by default.

    Raises:
        ValueError: if ``labeled_num`` is not one of the published ones.
    """
    _check_published(labeled_num)
    return f"{base_url.rstrip('/')}/{published_relative_path(labeled_num)}"


PUBLISHED_CHECKPOINTS: dict[int, tuple[str, str]] = {
    n: (f"{PUBLISHED_BASE_URL}/{published_relative_path(n)}", blob_id) for n, blob_id in _PUBLISHED_BLOB_IDS.items()
}
"""``labeled_num -> (url, git blob id)`` of the published ``unet_3D_dt`` best models (SPEC section 2)."""


def published_checkpoint_path(model_dir: PathLike, labeled_num: int) -> Path:
    """Where a best model trained with ``labeled_num`` labelled cases lives under ``model_dir``.

    ``<model_dir>/BraTs2019_UGMCL_{labeled_num}/unet_3D_dt/unet_3D_dt_best_model.pth``, the layout of the original
    repository's ``model/`` folder (so ``test_3D_dt.py`` finds downloaded and self-trained models alike).
    """
    return Path(model_dir) / f"BraTs2019_UGMCL_{labeled_num}" / "unet_3D_dt" / "unet_3D_dt_best_model.pth"


def git_blob_id(path_or_bytes: PathLike | bytes | bytearray | memoryview) -> str:
    """Git's object id of a blob holding these bytes, as printed by ``git hash-object``.

        id = sha1(b"blob " + str(len(data)).encode() + b"\\0" + data)   (40 lowercase hex digits)

    Args:
        path_or_bytes: the data itself, or a file path; files are read in 1 MiB chunks.

    Raises:
        FileNotFoundError: if the path does not exist.
        IsADirectoryError: if the path is a folder.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = memoryview(path_or_bytes).cast("B")
        digest = hashlib.sha1(b"blob %d\0" % data.nbytes)
        digest.update(data)
        return digest.hexdigest()
    with open(path_or_bytes, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest = hashlib.sha1(b"blob %d\0" % size)
        read = 0
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
            read += len(chunk)
    if read != size:  # the header promised `size` bytes; a file changing under us would give a wrong id
        raise CheckpointError(f"{path_or_bytes} changed while being hashed ({size} bytes expected, {read} read)")
    return digest.hexdigest()


def download_file(
    url: str,
    dest: PathLike,
    expected_blob_id: str | None = None,
    progress: bool = True,
    timeout: float = 60,
) -> Path:
    """Download ``url`` to ``dest``; check its git blob id and that it is a plain ``state_dict``, then rename.

    The bytes go to a temporary file beside ``dest``. Only when its blob id equals ``expected_blob_id`` (when
    given) and ``torch.load(weights_only=True)`` reads it as a dict of ``str -> Tensor`` is it renamed onto
    ``dest``. On any failure the temporary file is removed and ``dest`` is left as it was (absent, or the
    previous file).

    Args:
        url: ``http://``, ``https://`` or ``file://`` URL; redirects are followed (GitHub's ``raw`` URLs redirect).
        dest: final path; missing parent folders are created (and removed again if the download fails).
        expected_blob_id: 40-hex git blob id to require (see :func:`git_blob_id`); ``None`` skips the check.
        progress: show a tqdm bar on stderr.
        timeout: seconds to wait for the connection and for each read.

    Returns:
        ``dest`` as a ``Path``.

    Raises:
        ValueError: if ``expected_blob_id`` is not 40 hex digits or the URL scheme is not supported.
        CheckpointError: on a network failure (unreachable host, HTTP error, time-out, truncated transfer), a blob
            id mismatch, or a file that is not a plain ``state_dict``.
    """
    expected = _normalise_blob_id(expected_blob_id) if expected_blob_id is not None else None
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise ValueError(f"cannot download {url!r}: expected an http://, https:// or file:// URL, found {scheme!r}")
    dest = Path(dest)
    created = [folder for folder in dest.parents if not folder.exists()]  # deepest first
    try:
        with atomic_path(dest) as tmp:
            size = _fetch(url, tmp, progress=progress, timeout=timeout, desc=dest.name)
            if expected is not None:
                found = git_blob_id(tmp)
                if found != expected:
                    raise CheckpointError(
                        f"{url}: downloaded {size} bytes with git blob id {found}, expected {expected}; not saved to "
                        f"{dest} (corrupt or partial download, or a different file at this URL)"
                    )
            _load_plain_state_dict(tmp, source=url)
    except BaseException:
        for folder in created:  # leave no empty model folders behind a failed download
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return dest


def load_state_dict_file(path: PathLike, map_location: Any = "cpu") -> StateDict:
    """Read a ``state_dict`` from a checkpoint file with ``torch.load(weights_only=True)``.

    Accepts a plain ``state_dict`` (the published format) or a training checkpoint: a dict whose ``"student"``,
    ``"state_dict"`` or ``"model"`` entry (looked up in that order) is one. A ``module.`` prefix on every key
    (``DistributedDataParallel`` / ``DataParallel``) or ``_orig_mod.`` (``torch.compile``) is removed.

    Args:
        path: checkpoint file.
        map_location: where tensors are placed, as in ``torch.load`` (CPU by default).

    Returns:
        ``{name: tensor}`` ready for ``nn.Module.load_state_dict``.

    Raises:
        CheckpointNotFoundError: if ``path`` does not exist (a ``FileNotFoundError`` too).
        CheckpointError: if the file is not a readable weights-only checkpoint, or holds no ``state_dict``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    obj = _torch_load(path, map_location=map_location, source=str(path))
    return _extract_state_dict(obj, source=str(path))


def load_weights(
    net: nn.Module,
    path_or_state: PathLike | Mapping[str, torch.Tensor],
    strict: bool = True,
    map_location: Any = None,
) -> Any:
    """Load weights from a file or a mapping into ``net``, with a short message when they do not fit.

    Keys and shapes are compared with ``net.state_dict()`` before anything is copied, so on an error the network
    is unchanged. Shape mismatches are always an error; missing and unexpected keys only when ``strict``.

    Args:
        net: the network to fill.
        path_or_state: checkpoint path (read with :func:`load_state_dict_file`), or a ``state_dict`` / training
            checkpoint dict already in memory (``module.`` prefixes are removed as well).
        strict: require exactly the network's keys, as in ``nn.Module.load_state_dict``.
        map_location: where to read a file's tensors; ``None`` means the device of ``net``'s first parameter
            (CPU for a network without parameters).

    Returns:
        ``nn.Module.load_state_dict``'s result: a named tuple of ``missing_keys`` and ``unexpected_keys``.

    Raises:
        CheckpointError: naming the source and the first few missing keys, unexpected keys and shape mismatches.
    """
    if isinstance(path_or_state, Mapping):
        source = "the given state_dict"
        state = _extract_state_dict(path_or_state, source=source)
    else:
        source = str(path_or_state)
        if map_location is None:
            first = next(iter(net.parameters()), None)
            map_location = first.device if first is not None else "cpu"
        state = load_state_dict_file(path_or_state, map_location=map_location)
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    if strict and missing:
        problems.append(_first_few(f"{len(missing)} missing key(s)", missing))
    if strict and unexpected:
        problems.append(_first_few(f"{len(unexpected)} unexpected key(s)", unexpected))
    if shapes:
        problems.append(_first_few(f"{len(shapes)} shape mismatch(es)", shapes))
    if problems:
        raise CheckpointError(f"weights in {source} do not fit {type(net).__name__}: " + "; ".join(problems))
    try:
        return net.load_state_dict(state, strict=strict)
    except RuntimeError as exc:  # e.g. a module's own load hook refusing a value
        raise CheckpointError(
            f"weights in {source} could not be loaded into {type(net).__name__}: {_one_line(exc)}"
        ) from None


# ---------------------------------------------------------------------------------------------------------------------


def _check_published(labeled_num: int) -> None:
    if labeled_num not in _PUBLISHED_BLOB_IDS:
        raise ValueError(
            f"no published checkpoint for labeled_num={labeled_num!r}; published: {sorted(_PUBLISHED_BLOB_IDS)}"
        )


def _normalise_blob_id(blob_id: str) -> str:
    value = str(blob_id).strip().lower()
    if not _BLOB_ID_RE.fullmatch(value):
        raise ValueError(f"a git blob id is 40 hexadecimal digits, found {blob_id!r}")
    return value


def _fetch(url: str, dest: Path, progress: bool, timeout: float, desc: str) -> int:
    """Stream ``url`` into ``dest``; return the number of bytes written. Network errors become CheckpointError."""
    request = urllib.request.Request(url, headers={"User-Agent": "UG-MCL-download/1.0"})
    written = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress
            ) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:  # before URLError: HTTPError is a subclass
        raise CheckpointError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise CheckpointError(f"download of {url} failed: no answer within {timeout} s") from None
        where = "cannot reach the server" if url.lower().startswith("http") else "cannot open it"
        raise CheckpointError(f"download of {url} failed: {where} ({_one_line(reason)})") from None
    except TimeoutError:
        raise CheckpointError(
            f"download of {url} failed: timed out after {written} bytes (no data for {timeout} s)"
        ) from None
    except (OSError, http.client.HTTPException) as exc:
        raise CheckpointError(
            f"download of {url} failed after {written} bytes: {type(exc).__name__}: {_one_line(exc)}"
        ) from None
    if total is not None and written != total:
        raise CheckpointError(f"download of {url} is truncated: {written} of {total} bytes received")
    return written


def _torch_load(path: Path, map_location: Any, source: str) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load raises many types for bad input (UnpicklingError, RuntimeError, EOFError...)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if lines and lines[0].startswith("Weights only load failed"):
            # torch wraps every weights-only unpickling error in the same long text; keep its one informative line
            boilerplate = ("Please file an issue", "Check the documentation")
            detail = next((line for line in lines[1:] if not line.startswith(boilerplate)), "unknown reason")
            detail = detail.rstrip(".")
            if "global" in detail.lower():
                raise CheckpointError(
                    f"{source} holds objects other than tensors and plain containers, refused by "
                    f"torch.load(weights_only=True) ({detail}); re-save it as a plain state_dict if you trust it"
                ) from None
            raise CheckpointError(
                f"{source} is not a readable PyTorch checkpoint (unpickling failed: {detail})"
            ) from None
        detail = lines[0] if lines else "the file is empty or truncated"
        raise CheckpointError(
            f"{source} is not a readable PyTorch checkpoint ({type(exc).__name__}: {detail})"
        ) from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _extract_state_dict(obj: Any, source: str) -> StateDict:
    """The ``state_dict`` held by ``obj``: ``obj`` itself, or its first wrapper entry that is one; prefixes removed."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, expected a state_dict (dict of str -> Tensor)")
    state = obj
    if not _is_state_dict(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and _is_state_dict(obj[k])), None)
        if inner is None:
            keys = sorted(map(str, obj))
            raise CheckpointError(
                f"{source} holds a dict that is neither a state_dict (str -> Tensor) nor a training checkpoint with "
                f"one under {list(_WRAPPER_KEYS)}; {_first_few('its keys', keys)}"
            )
        state = inner
    if not state:
        raise CheckpointError(f"{source} holds an empty state_dict")
    return _strip_prefixes(dict(state))


def _strip_prefixes(state: StateDict) -> StateDict:
    changed = True
    while changed:  # DDP around a compiled model gives "module._orig_mod."
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _load_plain_state_dict(path: Path, source: str) -> None:
    """Check that ``path`` is a plain ``state_dict`` (the published format), not any other pickle."""
    obj = _torch_load(path, map_location="cpu", source=source)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{source} holds a {type(obj).__name__}, expected a plain state_dict (dict of str -> Tensor)"
        )
    if not _is_state_dict(obj):
        bad = [
            f"{k!r}: {type(v).__name__}"
            for k, v in obj.items()
            if not (isinstance(k, str) and isinstance(v, torch.Tensor))
        ]
        raise CheckpointError(f"{source} is a dict but not a plain state_dict; {_first_few('non-tensor entries', bad)}")
    if not obj:
        raise CheckpointError(f"{source} holds an empty state_dict")


def _first_few(label: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN_KEYS])
    more = f" ... and {len(items) - _SHOWN_KEYS} more" if len(items) > _SHOWN_KEYS else ""
    return f"{label}: {shown}{more}"


def _one_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
