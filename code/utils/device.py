"""Pick the compute device at run time (never call ``.cuda()`` blindly)."""

from __future__ import annotations

import argparse

import torch

__all__ = ["check_device_argument", "get_device"]


def get_device(name: str | None = "auto") -> torch.device:
    """Return ``cuda`` when available for ``"auto"``/``None``, else ``cpu``; otherwise ``torch.device(name)``.

    Raises:
        ValueError: if a CUDA device is asked for on a machine without one.
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine; use --device cpu")
    return device


def check_device_argument(parser: argparse.ArgumentParser, name: str | None) -> None:
    """Stop through ``parser.error`` (one line, exit status 2) if :func:`get_device` refuses ``name``."""
    try:
        get_device(name)
    except (ValueError, RuntimeError) as err:  # RuntimeError: a string torch.device cannot parse
        parser.error(str(err))
