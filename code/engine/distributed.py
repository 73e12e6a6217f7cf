"""Data-parallel training with ``torchrun`` (PyTorch DistributedDataParallel), set up in this one place.

``torchrun --nproc_per_node N train_UGMCL_3D.py ...`` starts N processes and gives each the environment variables
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init_distributed` reads them,
joins the process group (backend ``nccl`` on CUDA, ``gloo`` on the CPU) and picks the device of the process
(``cuda:LOCAL_RANK``, or the CPU). Without them (a plain ``python train_UGMCL_3D.py``), or with ``WORLD_SIZE=1``,
nothing is initialised and every helper here is the identity: single-process training is unchanged.

What stays the same on every rank, and why:

- the student: same seed before it is built, and :func:`wrap_model` (DDP) broadcasts rank 0's weights and then
  averages the gradients, ``g = (1/N) sum_r g_r``, so every rank applies the same SGD step; :func:`sync_buffers`
  gives every rank rank 0's BatchNorm statistics after the step;
- the EMA teacher: built from the (broadcast) student and updated from identical students, so it never drifts;
- the decisions: :func:`mean_over_ranks` makes a non-finite loss on any rank stop every rank at the same
  iteration, and :func:`fail_together` makes a set-up error on one rank (e.g. a node without the data) stop all.

Only rank 0 writes the log, TensorBoard events, ``config.json`` and checkpoints, and runs validation; the others
wait for its result (:func:`broadcast_object`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from utils.device import get_device

__all__ = [
    "DistInfo",
    "barrier",
    "broadcast_object",
    "cleanup",
    "fail_together",
    "gather_objects",
    "init_distributed",
    "is_main",
    "mean_over_ranks",
    "sync_buffers",
    "wrap_model",
]

# Rank 0 validates while the other ranks wait in a collective, and the default NCCL timeout (10 min) can be too
# short for a large validation set. A rank that fails does not leave the others waiting that long: torchrun stops
# the whole group as soon as one process exits with an error.
_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the run.

    Attributes:
        rank: global process index, 0 .. world_size - 1 (``RANK``).
        world_size: number of processes (``WORLD_SIZE``); 1 without torchrun.
        local_rank: process index on this node (``LOCAL_RANK``), the CUDA device index.
        device: the device this process trains on.
        owns_group: True when :func:`init_distributed` created the process group (and :func:`cleanup` ends it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, validates and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer (set by torchrun), found {text!r}") from None


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group, or describe a single process when there is none.

    With ``WORLD_SIZE`` > 1 the process group is initialised from the environment (``env://``) with backend
    ``nccl`` when the device is CUDA and ``gloo`` otherwise; a process group that the caller already initialised
    is reused (and left alone by :func:`cleanup`). The device is ``device`` (``"auto"``: CUDA when available)
    with index ``LOCAL_RANK`` for CUDA.

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (``--device``); with several processes a CUDA device must not
            name an index, each process uses ``cuda:LOCAL_RANK``.
    Returns:
        the :class:`DistInfo` of this process; ``DistInfo(device=get_device(device))`` without torchrun.
    Raises:
        ValueError: for a CUDA device with an index, a CUDA device missing on this machine, fewer GPUs than
            local processes, or malformed torchrun variables.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DistInfo(device=get_device(device))
    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE is {world_size}, but this PyTorch build has no torch.distributed")
    local_rank = _env_int("LOCAL_RANK", 0)
    resolved = get_device(device)
    if resolved.type == "cuda":
        if resolved.index is not None:
            raise ValueError(
                f"--device {device} names one GPU, but torchrun starts {world_size} processes; use --device cuda "
                "(each process takes cuda:LOCAL_RANK) and CUDA_VISIBLE_DEVICES to choose the GPUs"
            )
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but this node has {torch.cuda.device_count()}; "
                "start at most one process per GPU (--nproc_per_node)"
            )
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo", timeout=_TIMEOUT)
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, resolved, owns)


def cleanup(info: DistInfo, synchronize: bool = True) -> None:
    """End the process group if :func:`init_distributed` created it.

    With ``synchronize`` (the normal end of a run) every rank first waits for the others: tearing gloo down
    while a peer still talks to it can abort the process. After an error, pass ``False`` so a failing rank
    exits at once and torchrun stops the others.
    """
    if info.owns_group and dist.is_initialized():
        if synchronize:
            barrier(info)  # with NCCL on this process's GPU (a bare dist.barrier() guesses the device and warns)
        dist.destroy_process_group()


def is_main() -> bool:
    """True in rank 0 of a process group, and in a process without one."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def wrap_model(model: nn.Module, info: DistInfo, example: Tensor | None = None) -> nn.Module:
    """``DistributedDataParallel(model)`` with several processes, ``model`` itself otherwise.

    Wrapping broadcasts rank 0's parameters and buffers; afterwards every backward through the wrapper averages
    the gradients over the processes, ``g = (1/N) sum_r g_r``. Keep using ``model`` (not the wrapper) for
    checkpoints, the EMA teacher and validation, and call :func:`sync_buffers` after each optimiser step.

    A method may leave a head out of its loss (the SDF head of ``vnet_dt`` in the supervised baseline, the
    auxiliary maps of ``unet_3D_ds``); DDP must then look for unused parameters at every iteration
    (``find_unused_parameters=True``). That search costs a graph traversal and makes DDP warn when it finds
    nothing, so it is switched on only when some output of ``model`` on ``example`` does not depend on every
    parameter (always, without ``example``).

    Args:
        model: the network, already on ``info.device``.
        info: this process.
        example: an input the network accepts, e.g. ``(1, C, 32, 32, 32)`` zeros on ``info.device``.
    """
    if not info.is_distributed:
        return model
    find_unused = True if example is None else not _every_output_uses_every_parameter(model, example)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)


def _every_output_uses_every_parameter(model: nn.Module, example: Tensor) -> bool:
    """Whether each output tensor of ``model(example)`` has a gradient path to every trainable parameter.

    Run in eval mode (no dropout draw, no BatchNorm statistics update), so training is not disturbed.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            output = model(example)
        outputs = output if isinstance(output, (tuple, list)) else [output]
        outputs = [o for o in outputs if isinstance(o, Tensor) and o.requires_grad]
        if not outputs:
            return False
        for out in outputs:
            grads = torch.autograd.grad(out.float().sum(), params, retain_graph=True, allow_unused=True)
            if any(g is None for g in grads):
                return False
        return True
    finally:
        model.train(was_training)


def sync_buffers(model: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (e.g. BatchNorm running statistics) to every rank; no-op without buffers.

    Each rank updates them from its own batch in the forward pass. DDP copies rank 0's before each forward;
    called after the optimiser step as well, this keeps the whole student identical at the EMA update too (the
    teacher copies the student's buffers), and so the teacher.
    """
    if not info.is_distributed:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op in a single process)."""
    if info.is_distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` is ignored elsewhere); ``obj`` in a single process."""
    if not info.is_distributed:
        return obj
    box = [obj if info.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device(info))
    return box[0]


def gather_objects(obj: Any, info: DistInfo, dst: int = 0) -> list[Any] | None:
    """``[obj of rank 0, obj of rank 1, ...]`` on rank ``dst``, None on the others; ``[obj]`` in a single process."""
    if not info.is_distributed:
        return [obj]
    # gather_object needs NCCL's current device set, which init_distributed did
    out: list[Any] | None = [None] * info.world_size if info.rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def mean_over_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """The mean of each value over the processes (the same keys on every rank): ``(1/N) sum_r v_r``.

    A NaN or infinity on any rank makes the mean non-finite, so every rank takes the same stop decision.
    Returns ``values`` unchanged in a single process.
    """
    if not info.is_distributed:
        return values
    keys = list(values)
    stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device(info))
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    return dict(zip(keys, (stacked / info.world_size).tolist()))


@contextmanager
def fail_together(info: DistInfo, make_error: Callable[[], BaseException]) -> Iterator[None]:
    """Raise on every rank when the block raised on any: ``make_error()`` where it did not.

    Each rank reaches exactly one agreement collective (success or failure), so a rank whose set-up failed (e.g. a
    node without the data) cannot leave the others blocked in the DDP broadcast. No-op in a single process.
    """
    if not info.is_distributed:
        yield
        return
    try:
        yield
    except BaseException:
        _all_ok(False, info)
        raise
    if not _all_ok(True, info):
        raise make_error()


def _all_ok(ok: bool, info: DistInfo) -> bool:
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=_comm_device(info))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _comm_device(info: DistInfo) -> torch.device:
    """NCCL moves CUDA tensors only; gloo takes CPU tensors."""
    return info.device if dist.get_backend() == "nccl" else torch.device("cpu")
