"""``torch.compile`` of the networks' forwards, refused with a clear message where Inductor cannot generate code."""

from __future__ import annotations

import importlib.util
import os
import shutil

import torch
from torch import nn

__all__ = ["COMPILE_BACKEND", "CompileError", "check_compile_support", "compile_networks"]

# Dynamo's back end. Testing hook, not a user option: the tests use "eager" (Dynamo's tracing without code
# generation), also in torchrun's processes, through UGMCL_COMPILE_BACKEND=eager.
COMPILE_BACKEND = os.environ.get("UGMCL_COMPILE_BACKEND", "inductor")


class CompileError(ValueError):
    """``--compile 1`` cannot work on this machine; the message says what is missing."""


def check_compile_support(device: torch.device) -> None:
    """Refuse compiling where Inductor cannot generate code: on CUDA without Triton or on a GPU older than compute
    capability 7.0, on CPU without a C++ compiler.

    Raises:
        CompileError: naming what is missing (Inductor would otherwise fail inside the first iteration).
    """
    if COMPILE_BACKEND != "inductor":
        return
    if device.type == "cpu" and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        raise CompileError("--compile 1 on CPU needs a C++ compiler (g++ or clang++), and none is on PATH; "
                           "run without --compile")
    if device.type != "cuda":
        return
    if importlib.util.find_spec("triton") is None:
        raise CompileError("--compile 1 on CUDA needs Triton, which is not installed (pip install triton; the "
                           "Linux CUDA wheels of torch bring it), or run without --compile")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (7, 0):
        raise CompileError(f"--compile 1 needs a GPU of compute capability 7.0 or newer (Triton); "
                           f"{torch.cuda.get_device_name(device)} is {major}.{minor}: run without --compile")


def compile_networks(*nets: nn.Module) -> None:
    """``torch.compile`` each network's forward in place (``nn.Module.compile``).

    The modules themselves stay (``state_dict`` keys, an EMA update, copies and checkpoints do not change); only
    their calls run through Dynamo. ``dynamic=False``: each input shape gets its own static graph on first use.
    """
    for net in nets:
        net.compile(backend=COMPILE_BACKEND, dynamic=False)
