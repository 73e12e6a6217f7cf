"""The one door for optimisations that keep the maths: training, ``test_3D_dt.py`` and ``predict.py`` go through it.

Nothing under ``networks/`` or ``methods/`` imports this package: it changes networks by swapping modules and hands
the methods a :class:`methods.base.Passes`. What it does:

* dropout masks drawn in the logical order and, for the U-Nets, ahead of the forward (``speed.dropout``), which
  lets a method run the teacher's passes first and in smaller pieces with the random stream of the released order;
* ``--fast_network`` (CPU): fused InstanceNorm + ReLU (``speed.fused_norm``), activations rebuilt in the backward
  instead of kept (``speed.recompute``) and channels-last layout (``speed.layout``); the same maths, float
  rounding differs, so it is off by default;
* ``--keep_freed_memory`` (CPU, glibc): freed memory kept for reuse (``speed.allocator``): 2 (default) while the
  repeated passes run (a step's teacher passes, a validation, one case's sliding window), 1 throughout, 0 never;
* ``--compile 1``: ``torch.compile`` of the forwards (``speed.compile``).

Figures for each are in ``results/cpu.md`` and ``results/gpu.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import speed.compile as compile_support
from methods.base import Passes
from speed.allocator import keep_freed_memory, keeping_freed_memory
from speed.compile import COMPILE_BACKEND, CompileError, check_compile_support, compile_networks
from speed.dropout import predraw_dropout
from speed.fused_norm import fuse_norm_relu
from speed.layout import to_channels_last
from speed.passes import PredrawnPasses
from speed.recompute import keep_activations_as_sources

__all__ = [
    "COMPILE_BACKEND",
    "CompileError",
    "InferenceSpeed",
    "SpeedOptions",
    "TrainingSpeed",
    "add_arguments",
    "make_fast",
    "options_from_args",
    "prepare_inference",
    "prepare_training",
]

KEEP_FREED_MEMORY = (0, 1, 2)


@dataclass(frozen=True)
class SpeedOptions:
    """The speed options; none changes the maths.

    Attributes:
        fast_network: CPU: fused InstanceNorm + ReLU and channels-last activations (float rounding differs).
        keep_freed_memory: CPU: 2 keeps freed memory while repeated passes run, 1 throughout, 0 never.
        compile: ``torch.compile`` the forwards (not with ``fast_network``).
    Raises:
        ValueError: for a value out of range or ``compile`` with ``fast_network``.
    """

    fast_network: bool = False
    keep_freed_memory: int = 2
    compile: bool = False

    def __post_init__(self) -> None:
        if self.keep_freed_memory not in KEEP_FREED_MEMORY:
            raise ValueError(f"--keep_freed_memory must be one of {KEEP_FREED_MEMORY}, got {self.keep_freed_memory!r}")
        if self.compile and self.fast_network:
            raise ValueError("--compile 1 and --fast_network do not go together: the fused network's own autograd "
                             "steps do not compile; --fast_network is the eager CPU speed-up, --compile 1 the CUDA one")


def add_arguments(parser: argparse.ArgumentParser, defaults: SpeedOptions = SpeedOptions()) -> None:
    """Add the speed argument group, the same in training, testing and prediction (``--fast`` is an alias)."""
    g = parser.add_argument_group("speed (the same maths)")
    g.add_argument("--fast_network", "--fast", dest="fast_network", action="store_true",
                   default=defaults.fast_network,
                   help="CPU: fused InstanceNorm+ReLU and channels-last activations; float rounding differs from the "
                        "plain network (ignored on CUDA, where the plain network is faster)")
    g.add_argument("--keep_freed_memory", type=int, choices=KEEP_FREED_MEMORY, default=defaults.keep_freed_memory,
                   help="CPU: glibc keeps freed memory for reuse instead of page-faulting it in again: 2 = while the "
                        "repeated passes run (teacher passes, validation, one case's sliding window), then freed; "
                        "1 = always (faster, more memory); 0 = glibc's default")
    g.add_argument("--compile", type=int, choices=(0, 1), default=int(defaults.compile),
                   help="1: torch.compile the forwards (Inductor; for CUDA). The first calls compile; dropout then "
                        "draws other random numbers, like another seed")


def options_from_args(args: argparse.Namespace) -> SpeedOptions:
    """The :class:`SpeedOptions` of parsed arguments (see :func:`add_arguments`)."""
    return SpeedOptions(bool(args.fast_network), int(args.keep_freed_memory), bool(args.compile))


def make_fast(net: nn.Module) -> nn.Module:
    """Fused norm + ReLU, rebuilt activations and channels-last layout for ``net``, in place; returns ``net``."""
    fuse_norm_relu(net)
    keep_activations_as_sources(net)
    return to_channels_last(net)


@dataclass
class TrainingSpeed:
    """What :func:`prepare_training` set up: the method's passes and what the loop enters around its validations.

    Attributes:
        passes: hand to the method (``METHODS[name](student, cfg, passes=...)``).
        notes: one line per choice made, for the log.
    """

    options: SpeedOptions
    device: torch.device
    passes: Passes
    notes: list[str] = field(default_factory=list)

    def around_validation(self) -> AbstractContextManager[Any]:
        """A context manager for a validation (memory kept during it with ``keep_freed_memory`` 2 on CPU)."""
        return _around_repeated_passes(self.options, self.device)

    def compile(self, nets: list[nn.Module]) -> None:
        """``torch.compile`` the method's networks (student and teacher) when asked for."""
        if self.options.compile:
            compile_networks(*nets)
            self.notes.append(f"torch.compile ({compile_support.COMPILE_BACKEND}): {len(nets)} network(s) compile on first use")


def _keeps_memory_around_passes(options: SpeedOptions, device: torch.device) -> bool:
    """``--keep_freed_memory 2`` on CPU: glibc keeps freed memory while the repeated passes run."""
    return device.type == "cpu" and options.keep_freed_memory == 2


def _around_repeated_passes(options: SpeedOptions, device: torch.device) -> AbstractContextManager[Any]:
    """``speed.allocator.keeping_freed_memory()`` where :func:`_keeps_memory_around_passes`, else a no-op."""
    return keeping_freed_memory() if _keeps_memory_around_passes(options, device) else contextlib.nullcontext()


def _keep_memory_throughout(options: SpeedOptions, device: torch.device, notes: list[str]) -> None:
    if device.type == "cpu" and options.keep_freed_memory == 1:
        kept = keep_freed_memory()  # process-wide; before the large allocations
        notes.append(f"glibc keeps freed memory for reuse: {'yes' if kept else 'not available here'}")


def _check_compile(options: SpeedOptions, device: torch.device, notes: list[str]) -> None:
    if options.compile:
        check_compile_support(device)
        if device.type == "cpu":
            notes.append("--compile 1 on CPU: compiling takes minutes and brings no speed-up there")


def prepare_training(student: nn.Module, options: SpeedOptions, device: torch.device) -> TrainingSpeed:
    """Set up ``student`` (in place, before the method copies it into a teacher) and the process for training.

    Raises:
        CompileError: with ``compile`` where it cannot work (:func:`speed.compile.check_compile_support`).
    """
    notes: list[str] = []
    _check_compile(options, device, notes)
    predraw_dropout(student)
    if options.fast_network and device.type == "cpu":
        make_fast(student)
        notes.append("fast network: fused InstanceNorm+ReLU, channels-last")
    elif options.fast_network:
        notes.append(f"--fast_network ignored on {device.type}: the plain network is faster there")
    _keep_memory_throughout(options, device, notes)
    keep_around_teacher = _keeps_memory_around_passes(options, device)
    if keep_around_teacher:
        notes.append("glibc keeps freed memory during the teacher's passes and the validations")
    return TrainingSpeed(options, device, PredrawnPasses(keep_around_teacher), notes)


@dataclass
class InferenceSpeed:
    """What :func:`prepare_inference` set up: the network to predict with and what to enter around each case."""

    net: nn.Module
    options: SpeedOptions
    device: torch.device
    notes: list[str] = field(default_factory=list)

    def around_case(self) -> AbstractContextManager[Any]:
        """A context manager for one case's prediction (memory kept during it with ``keep_freed_memory`` 2 on CPU)."""
        return _around_repeated_passes(self.options, self.device)


def prepare_inference(net: nn.Module, options: SpeedOptions, device: torch.device | str) -> InferenceSpeed:
    """The network to predict with on ``device``: ``net`` moved there, or a changed copy (``net`` stays as it is).

    Raises:
        CompileError: with ``compile`` where it cannot work.
    """
    device = torch.device(device)
    notes: list[str] = []
    _check_compile(options, device, notes)
    fast = options.fast_network and device.type == "cpu"
    if options.fast_network and not fast:
        notes.append(f"--fast_network ignored on {device.type}: the plain network is faster there")
    if fast or options.compile:
        net = copy.deepcopy(net)
    net = net.to(device)
    if fast:
        make_fast(net)
    if options.compile:
        compile_networks(net)
    _keep_memory_throughout(options, device, notes)
    return InferenceSpeed(net, options, device, notes)
