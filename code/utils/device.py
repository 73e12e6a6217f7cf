"""Pick the compute device at run time (never call ``.cuda()`` blindly)."""

from __future__ import annotations

import torch

__all__ = ["get_device"]


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
