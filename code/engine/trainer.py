"""The training loop, written once for every method (UG-MCL and the baselines).

``train(cfg)`` reads ``<root>/data/*.h5`` through the split lists, builds the student network and the
method (``methods.METHODS[cfg.method]``), and runs ``cfg.max_iterations`` SGD steps. Outputs go to
``<model_dir>/<exp>_<labeled_num>/<model>/``:

- ``log.txt`` and TensorBoard events (losses, weights, threshold, validation Dice/HD95, image grids),
- ``config.json`` (the full configuration),
- ``<model>_best_model.pth``: the best-validation student as a plain ``state_dict`` (published format),
- ``checkpoint_latest.pth``: student, method state (teacher), optimiser, iteration, RNG states and
  config, written atomically every ``save_interval`` iterations and at the end; ``--resume`` continues
  from it.

Exact resume: the batch drawn at iteration ``t`` (indices and augmentation) depends only on
``(seed, t)``, and the torch / numpy / python RNG states are saved, so on CPU in deterministic mode a
run of 2N iterations equals a run of N iterations resumed for N more, bit for bit.

Data-parallel training: under ``torchrun --nproc_per_node N`` (set up in ``engine/distributed.py``) each of
the N processes draws its own batch (iteration ``t`` of rank ``r`` is batch ``t * N + r`` of the same plan,
``labeled_bs`` labelled rows first), DistributedDataParallel averages the gradients, and the EMA teacher
follows identical students, so weights and teacher stay identical on every rank. Rank 0 alone writes the
outputs above and validates; every rank reads the checkpoint it broadcasts on ``--resume``, and each rank's
RNG states are saved, so resuming with the same N is exact as well. Without torchrun nothing changes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dataloaders.brats2019 import BraTS2019, read_split_file
from dataloaders.samplers import TwoStreamBatchSampler
from dataloaders.transforms import Compose, RandomRotFlipCrop, ToTensor
from engine.config import TrainConfig
from engine.distributed import (
    DistInfo,
    broadcast_object,
    cleanup,
    fail_together,
    forward_through,
    gather_objects,
    init_distributed,
    mean_over_ranks,
    sync_buffers,
    wrap_model,
)
from engine.validation import validate
from methods import METHODS
from methods.base import Batch, EMATeacherMethod, Method
from networks.net_factory_3d import net_factory_3d
from networks.outputs import segmentation_logits
from networks.unet_3D import set_fused_norm, to_channels_last
from utils.allocator import keep_freed_memory, keeping_freed_memory
from utils.atomic import atomic_torch_save, atomic_write_text
from utils.seeding import seed_everything, set_deterministic

__all__ = ["TrainingError", "build_network", "check_compile_support", "check_config", "compile_forwards", "logged_losses",
           "run_dir", "train"]

logger = logging.getLogger("ugmcl")

# Testing hook, not a user option: with UGMCL_DUMP_RANK_STATE=1 every rank writes ``rank<r>_final.pt`` (its
# student, method state and the cases it trained on) into the run folder, so a test can compare the ranks.
_DUMP_RANK_STATE = "UGMCL_DUMP_RANK_STATE"


class TrainingError(RuntimeError):
    """A problem with the inputs or the run that stops training with a one-line message."""


# ----------------------------------------------------------------------------------------------
# configuration and inputs
# ----------------------------------------------------------------------------------------------
def check_config(cfg: TrainConfig) -> None:
    """Reject impossible option combinations before anything is built.

    Raises:
        TrainingError: naming the option, what was expected and what was found.
    """
    if len(cfg.patch_size) != 3 or any(int(p) <= 0 or int(p) % 16 for p in cfg.patch_size):
        raise TrainingError(f"--patch_size must be three positive multiples of 16, got {list(cfg.patch_size)}")
    px, py, pz = (int(p) for p in cfg.patch_size)
    if not (0 < cfg.stride_xy <= min(px, py) and 0 < cfg.stride_z <= pz):
        raise TrainingError(
            f"validation strides --stride_xy {cfg.stride_xy} / --stride_z {cfg.stride_z} must be positive and at most "
            f"the patch {list(cfg.patch_size)} (x, y / z), or the sliding windows leave gaps"
        )
    if cfg.method not in METHODS:
        raise TrainingError(f"unknown --method {cfg.method!r}; choose one of {sorted(METHODS)}")
    if cfg.labeled_bs < 1:
        raise TrainingError(f"--labeled_bs must be at least 1, got {cfg.labeled_bs}")
    if METHODS[cfg.method].uses_unlabeled and cfg.batch_size <= cfg.labeled_bs:
        raise TrainingError(
            f"--batch_size ({cfg.batch_size}) must be larger than --labeled_bs ({cfg.labeled_bs}): "
            "the rest of the batch holds the unlabelled patches"
        )
    if cfg.labeled_num < cfg.labeled_bs:
        raise TrainingError(f"--labeled_num ({cfg.labeled_num}) is smaller than --labeled_bs ({cfg.labeled_bs})")
    if cfg.max_iterations < 1:
        raise TrainingError(f"--max_iterations must be positive, got {cfg.max_iterations}")
    if cfg.variant not in ("released", "paper"):
        raise TrainingError(f"--variant must be 'released' or 'paper', got {cfg.variant!r}")
    if cfg.keep_freed_memory not in (0, 1, 2):
        raise TrainingError(f"--keep_freed_memory must be 0, 1 or 2, got {cfg.keep_freed_memory!r}")
    if cfg.compile and cfg.fast_network:
        raise TrainingError(
            "--compile 1 and --fast_network do not go together: the fused network's own autograd steps do not "
            "compile; --fast_network is the eager CPU speed-up, --compile 1 the CUDA one"
        )
    if cfg.lr_schedule not in ("constant", "poly"):
        raise TrainingError(f"--lr_schedule must be 'constant' or 'poly', got {cfg.lr_schedule!r}")


def run_dir(cfg: TrainConfig, model_dir: str | Path = "../model") -> Path:
    """``<model_dir>/<exp>_<labeled_num>/<model>``: the released code's output folder."""
    return Path(model_dir) / f"{cfg.exp}_{cfg.labeled_num}" / cfg.model


def _read_split(root: Path, split: str) -> list[str]:
    path = root / f"{split}.txt"
    if not path.is_file():
        raise TrainingError(
            f"split list {path} not found: prepare the data with `python preprocess_brats2019.py --raw_dir RAW "
            f"--out_dir {root}` (see data/README.md) or run the synthetic demo with `make demo`"
        )
    try:
        return read_split_file(path)
    except ValueError as err:  # a name listed twice
        raise TrainingError(str(err)) from err


def check_data(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """Return the train and val case lists after checking the data folder; raise TrainingError if unusable."""
    root = Path(cfg.root_path)
    if not root.is_dir():
        raise TrainingError(
            f"data folder {root} not found: prepare BraTS2019 with `python preprocess_brats2019.py --raw_dir RAW "
            f"--out_dir {root}` (see data/README.md) or run the synthetic demo with `make demo`"
        )
    train_cases = _read_split(root, "train")
    val_cases = _read_split(root, "val") if (root / "val.txt").is_file() else []
    if cfg.labeled_num > len(train_cases):
        raise TrainingError(
            f"--labeled_num {cfg.labeled_num} is larger than the training list {root / 'train.txt'} "
            f"({len(train_cases)} cases)"
        )
    if METHODS[cfg.method].uses_unlabeled and cfg.labeled_num == len(train_cases):
        raise TrainingError(
            f"--labeled_num {cfg.labeled_num} leaves no unlabelled case in {root / 'train.txt'} "
            f"({len(train_cases)} cases); use a smaller --labeled_num or --method supervised"
        )
    missing = [c for c in train_cases if not (root / "data" / f"{c}.h5").is_file()]
    if missing:
        raise TrainingError(f"{len(missing)} training case(s) have no h5 file, e.g. {root / 'data' / (missing[0] + '.h5')}")
    return train_cases, val_cases


def build_network(cfg: TrainConfig) -> nn.Module:
    """The student network named by ``cfg.model`` (``feature_scale`` applies to the U-Nets)."""
    kwargs: dict[str, Any] = {}
    if cfg.model.startswith("unet"):
        kwargs["feature_scale"] = cfg.feature_scale
    try:
        return net_factory_3d(cfg.model, in_chns=cfg.in_channels, class_num=cfg.num_classes, **kwargs)
    except ValueError as err:
        raise TrainingError(str(err)) from err


# ----------------------------------------------------------------------------------------------
# batches: the batch of iteration t depends only on (seed, t)
# ----------------------------------------------------------------------------------------------
class _SeededSamples(Dataset):
    """Wrap a dataset so that item ``(index, seed)`` applies the random transform with its own seed.

    Each sample's augmentation is then independent of worker count and order, which makes resumed
    runs reproduce the uninterrupted one exactly.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, seed = item
        np_state, py_state = np.random.get_state(), random.getstate()
        np.random.seed(seed)
        random.seed(seed)
        try:
            return self.dataset[index]
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _batch_plan(labeled: list[int], unlabeled: list[int], cfg: TrainConfig, start: int, rank: int = 0,
                world_size: int = 1) -> Iterator[list[tuple[int, int]]]:
    """Endless list of ``[(index, sample_seed), ...]`` batches, from iteration ``start`` on.

    Passes of the two-stream sampler are seeded by ``(seed, pass)``; sample seeds by ``(seed, k, slot)`` for
    plan batch ``k``. With ``world_size`` processes, iteration ``t`` of ``rank`` is plan batch
    ``k = t * world_size + rank``: the processes take turns in one plan, so within an iteration they train on
    different cases (as far as the pass has enough), and each batch keeps ``labeled_bs`` labelled rows first.
    With one process, ``k = t``.
    """
    secondary = cfg.batch_size - cfg.labeled_bs if unlabeled else 0
    sampler = TwoStreamBatchSampler(labeled, unlabeled, cfg.batch_size, secondary, seed=cfg.seed) if secondary else None
    step = 0  # k, the plan batch
    for epoch in range(10**9):
        if sampler is not None:
            sampler.set_epoch(epoch)
            batches: Iterator[list[int]] = iter(sampler)
        else:  # labelled data only: one permutation per pass, incomplete last batch dropped
            order = np.random.default_rng([cfg.seed, epoch]).permutation(labeled)
            n = len(order) - len(order) % cfg.labeled_bs
            batches = (list(order[i : i + cfg.labeled_bs]) for i in range(0, n, cfg.labeled_bs))
        for indices in batches:
            if step >= start * world_size and step % world_size == rank:
                seeds = np.random.SeedSequence([cfg.seed, step]).generate_state(len(indices))
                yield [(int(i), int(s)) for i, s in zip(indices, seeds)]
            step += 1


def make_batches(cfg: TrainConfig, start: int, rank: int = 0, world_size: int = 1,
                 seen: list[list[str]] | None = None) -> Iterator[Batch]:
    """The training batches of process ``rank`` of ``world_size`` from iteration ``start`` (labelled rows first),
    on the CPU; the case names of each batch are appended to ``seen`` when given."""
    dataset = BraTS2019(
        cfg.root_path, split="train", transform=_train_transform(cfg.patch_size)
    )
    n = len(dataset)
    labeled = list(range(cfg.labeled_num))
    unlabeled = list(range(cfg.labeled_num, n)) if METHODS[cfg.method].uses_unlabeled else []
    loader = DataLoader(
        _SeededSamples(dataset),
        batch_sampler=_batch_plan(labeled, unlabeled, cfg, start, rank, world_size),  # type: ignore[arg-type]
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global torch RNG untouched
    )
    for sample in loader:
        if seen is not None:
            seen.append(list(sample["name"]))
        yield Batch(sample["image"], sample["label"].long(), cfg.labeled_bs)


def _train_transform(patch: tuple[int, int, int]) -> Any:
    """The released augmentation, rot90/flip then a random crop, reading only the patch's box (same draws)."""
    return Compose([RandomRotFlipCrop(tuple(patch)), ToTensor()])


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _save_latest(path: Path, student: nn.Module, method: Method, optimizer: torch.optim.Optimizer,
                 step: int, best: dict[str, float], cfg: TrainConfig, rng: list[dict[str, Any]] | None = None) -> None:
    """Write ``checkpoint_latest.pth``; ``rng`` holds every rank's RNG states (default: this process's).

    With several ranks, ``rng`` is rank 0's and ``rng_per_rank`` all of them (with ``world_size``).
    """
    rng = [_rng_state()] if rng is None else rng
    state = {
        "student": student.state_dict(),
        "method": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "iteration": step,
        "best": best,
        "rng": rng[0],
        "config": cfg.to_dict(),
    }
    if len(rng) > 1:
        state.update(rng_per_rank=rng, world_size=len(rng))
    atomic_torch_save(state, path)


def _cpu_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """``net.state_dict()`` with every tensor on the CPU: a published-format file that plain ``torch.load`` opens
    on a machine without the GPU it was trained on."""
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def _load_latest(path: Path) -> dict[str, Any]:
    """``checkpoint_latest.pth`` with every tensor on the CPU: ``load_state_dict`` copies weights and optimizer
    state to the model's device, and the RNG setters take CPU byte tensors only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read is reported the same way
        raise TrainingError(f"cannot resume from {path}: {type(err).__name__}: {err}") from err


def _rank_seed(seed: int, rank: int, start: int = 0) -> int:
    """Seed of the dropout / noise streams of rank > 0 (rank 0 keeps the single-process stream of ``seed``)."""
    return int(np.random.SeedSequence([seed, rank, start]).generate_state(1)[0])


def _resume_rng(state: dict[str, Any], cfg: TrainConfig, info: DistInfo, start: int) -> None:
    """Restore this rank's RNG states; with another number of processes than saved, rank r > 0 reseeds."""
    per_rank = state.get("rng_per_rank") or [state["rng"]]
    if len(per_rank) == info.world_size:
        _set_rng_state(per_rank[info.rank])
        return
    logger.info("resuming %d process(es) from a checkpoint of %d: batches and random streams differ from an "
                "uninterrupted run from here on", info.world_size, len(per_rank))
    if info.is_main:
        _set_rng_state(state["rng"])
    else:
        seed_everything(_rank_seed(cfg.seed, info.rank, start))


# ----------------------------------------------------------------------------------------------
# logging
# ----------------------------------------------------------------------------------------------
def _setup_logging(out: Path | None) -> None:
    """Log to ``out/log.txt``; with ``out=None`` (ranks other than 0) log nothing."""
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    if out is None:
        logger.addHandler(logging.NullHandler())
        return
    fmt = logging.Formatter("[%(asctime)s.%(msecs)03d] %(message)s", datefmt="%H:%M:%S")
    file_handler = logging.FileHandler(out / "log.txt")
    file_handler.setFormatter(fmt)
    logger.addHandler(file_handler)


_LOGGED_LOSS = re.compile(r"\] iteration \d+ : loss :? ?([^,\s]+)")  # ours, or the released "loss : X"


def logged_losses(log_text: str) -> list[float]:
    """The per-iteration losses of a run's ``log.txt`` (its ``iteration N : loss ...`` lines), in order.

    Also reads the released code's logs, whose lines say ``iteration N : loss : X, ...``.
    """
    return [float(m.group(1)) for m in map(_LOGGED_LOSS.search, log_text.splitlines()) if m]


def _image_grid(batch: Batch, probs: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
    """A (1, H, W*k) grid of the middle slice of sample 0: input | prediction | label | extra volumes."""
    image = batch.image[0, 0].detach().float().cpu()
    z = image.shape[-1] // 2

    def norm(a: torch.Tensor) -> torch.Tensor:
        a = a.float()
        lo, hi = a.min(), a.max()
        return (a - lo) / (hi - lo) if hi > lo else torch.zeros_like(a)

    tiles = [norm(image[..., z]), probs[0].argmax(0).float().cpu()[..., z], batch.label[0].float().cpu()[..., z]]
    tiles += [norm(v.detach().float().cpu()[..., z]) for v in extra.values()]
    return torch.cat(tiles, dim=1).unsqueeze(0)


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------
def _lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.lr_schedule == "poly":
        return cfg.base_lr * (1.0 - step / cfg.max_iterations) ** cfg.poly_power
    return cfg.base_lr


# Dynamo's back end for ``--compile``. Testing hook, not a user option: the tests use "eager" (Dynamo's tracing
# without code generation), also in torchrun's processes through UGMCL_COMPILE_BACKEND=eager.
COMPILE_BACKEND = os.environ.get("UGMCL_COMPILE_BACKEND", "inductor")


def check_compile_support(device: torch.device) -> None:
    """Refuse ``--compile 1`` where Inductor cannot generate code: on CUDA no Triton or a GPU older than Volta, on
    CPU no C++ compiler. On CPU it also logs that compiling brings no speed-up there.

    Raises:
        TrainingError: naming what is missing (Inductor would otherwise fail deep inside the first iteration).
    """
    if device.type == "cpu":
        logger.warning("--compile 1 on CPU: no speed-up was measured there (torch 2.13, oneDNN convolutions), only "
                       "minutes of compiling")
    if COMPILE_BACKEND != "inductor":
        return
    if device.type == "cpu" and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        raise TrainingError("--compile 1 on CPU needs a C++ compiler (g++ or clang++), and none is on PATH; "
                            "train without --compile (it gives no speed-up on CPU)")
    if device.type != "cuda":
        return
    if importlib.util.find_spec("triton") is None:
        raise TrainingError("--compile 1 on CUDA needs Triton, which is not installed (pip install triton; the "
                            "Linux CUDA wheels of torch bring it), or train without --compile")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (7, 0):
        raise TrainingError(f"--compile 1 needs a GPU of compute capability 7.0 or newer (Triton); "
                            f"{torch.cuda.get_device_name(device)} is {major}.{minor}: train without --compile")


def compile_forwards(student: nn.Module, method: Method) -> None:
    """``torch.compile`` the forwards of the student and of the method's teacher, if any, in place.

    ``nn.Module.compile`` keeps the modules themselves (``state_dict`` keys, the EMA update, the teacher copy and the
    checkpoints do not change); only their calls run through Dynamo. ``dynamic=False``: every input shape (the
    batch, the Monte-Carlo chunk, a validation window) gets its own static graph, compiled on first use.
    """
    teacher = getattr(method, "teacher", None)
    for net in (student, teacher):
        if isinstance(net, nn.Module):
            net.compile(backend=COMPILE_BACKEND, dynamic=False)
    logger.info("torch.compile (%s): student%s forwards compile on first use", COMPILE_BACKEND,
                " and teacher" if isinstance(teacher, nn.Module) else "")


def _autocast(device: torch.device, enabled: bool) -> Any:
    if not enabled:
        return nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train(cfg: TrainConfig, model_dir: str | Path = "../model", progress: bool = True,
          stop_after: int | None = None) -> dict[str, Any]:
    """Train ``cfg.method`` and return a summary (``best``, ``iterations``, ``out_dir``, ``seconds``).

    Started by ``torchrun`` with ``WORLD_SIZE`` > 1, every process runs this function: the training is
    data-parallel (module docstring, ``engine/distributed.py``) and every rank returns the same summary.

    Args:
        cfg: the configuration.
        model_dir: parent of the run folder (``<model_dir>/<exp>_<labeled_num>/<model>``).
        progress: show a tqdm bar (rank 0 only).
        stop_after: stop (as if killed) after this many iterations, having saved ``checkpoint_latest.pth``;
            the schedule still follows ``cfg.max_iterations``. Used to test exact resume.

    Raises:
        TrainingError: bad options or device, missing data, an unreadable checkpoint or a non-finite loss (on
            every rank when any rank meets it).
    """
    check_config(cfg)
    try:
        info = init_distributed(cfg.device)
    except ValueError as err:
        raise TrainingError(str(err)) from err
    finished = False
    try:
        summary = _train(cfg, info, Path(model_dir), progress, stop_after)
        finished = True
        return summary
    finally:
        cleanup(info, synchronize=finished)


def _train(cfg: TrainConfig, info: DistInfo, model_dir: Path, progress: bool, stop_after: int | None) -> dict[str, Any]:
    """The body of :func:`train` for one process (rank ``info.rank`` of ``info.world_size``)."""
    device, main = info.device, info.is_main
    # --keep_freed_memory 2 (CPU): glibc keeps freed memory during the teacher's passes and the validations only
    keep_some = device.type == "cpu" and cfg.keep_freed_memory == 2
    out = run_dir(cfg, model_dir)
    latest = out / "checkpoint_latest.pth"
    state: dict[str, Any] | None = None
    with fail_together(info, lambda: TrainingError("stopped: another process failed while setting up (see its error)")):
        _, val_cases = check_data(cfg)  # on every rank: each node needs the data
        if main:
            out.mkdir(parents=True, exist_ok=True)
        _setup_logging(out if main else None)
        if main:
            atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        logger.info("config: %s", json.dumps(cfg.to_dict()))
        logger.info("device: %s", device)
        if cfg.compile:
            check_compile_support(device)
        if device.type == "cpu" and cfg.keep_freed_memory == 1:
            kept = keep_freed_memory()  # before the large allocations; process-wide, speed and memory only
            logger.info("glibc keeps freed memory for reuse: %s", "yes" if kept else "not available here")
        elif keep_some:
            logger.info("glibc keeps freed memory for reuse during the teacher's passes and the validations")
        if info.is_distributed:
            logger.info("data-parallel: %d processes, %d patches per iteration in all",
                        info.world_size, info.world_size * cfg.batch_size)
        if cfg.resume and main:  # rank 0 reads the checkpoint and broadcasts it: other nodes need no copy
            if not latest.is_file():
                raise TrainingError(f"--resume given but {latest} does not exist")
            state = _load_latest(latest)

    seed_everything(cfg.seed)  # the same initial weights on every rank
    set_deterministic(bool(cfg.deterministic))  # 0: cuDNN autotuning (benchmark mode) on CUDA
    student = build_network(cfg).to(device)
    if cfg.fast_network and device.type == "cpu":
        # fused InstanceNorm + ReLU and channels-last: same maths, float rounding differs. CPU only: on CUDA
        # (measured on an H200, bench/profile_train_step.py) cuDNN's plain contiguous network is the fastest.
        student = to_channels_last(set_fused_norm(student))
    # DDP (averages the gradients) with several processes, else the student itself
    model = wrap_model(student, info, torch.zeros(1, cfg.in_channels, *(min(p, 32) for p in cfg.patch_size), device=device))
    method = METHODS[cfg.method](student, cfg)  # the method keeps the plain student: teacher copy, EMA, state_dict
    if keep_some and isinstance(method, EMATeacherMethod):
        method.around_teacher_passes = keeping_freed_memory
    if cfg.compile:
        compile_forwards(student, method)
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported())
    if info.rank > 0:  # own dropout and teacher-noise streams; rank 0 keeps the single-process one
        seed_everything(_rank_seed(cfg.seed, info.rank))

    start, best = 0, {"dice": -1.0, "iteration": 0}
    if cfg.resume:
        state = broadcast_object(state, info)
        student.load_state_dict(state["student"])
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        start, best = int(state["iteration"]), dict(state["best"])
        _resume_rng(state, cfg, info, start)
        logger.info("resumed from %s at iteration %d", latest, start)
        del state

    from tensorboardX import SummaryWriter  # imported late: slow import, only needed here

    writer = SummaryWriter(str(out / "log")) if main else None
    seen: list[list[str]] | None = [] if os.environ.get(_DUMP_RANK_STATE) == "1" else None
    batches = make_batches(cfg, start, info.rank, info.world_size, seen)
    student.train()
    bar = _progress(range(start, cfg.max_iterations), progress and main, cfg)
    t0 = time.time()
    step = start
    try:
        for step in bar:
            lr = _lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches).to(device)
            with _autocast(device, cfg.amp), forward_through(method, model):
                loss, logs = method.training_step(batch, step)
            logs = mean_over_ranks({"loss": float(loss.detach()), **logs}, info)  # every rank: the same decision
            if not math.isfinite(logs["loss"]):
                raise TrainingError(
                    f"non-finite loss ({logs['loss']}) at iteration {step + 1}; stopped, the last good checkpoint "
                    f"is {latest if latest.is_file() else 'not written yet'}"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            sync_buffers(student, info)
            method.after_optimizer_step(step)
            iteration = step + 1

            logs["lr"] = lr
            if main:
                for key, value in logs.items():
                    writer.add_scalar(f"train/{key}", value, iteration)  # type: ignore[union-attr]
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{logs['loss']:.4f}")
                logger.info("iteration %d : %s", iteration, ", ".join(f"{k} {v:.6g}" for k, v in logs.items()))
                if iteration % max(1, cfg.val_interval // 4) == 0 or iteration == 1:
                    with torch.no_grad():
                        probs = torch.softmax(segmentation_logits(student(batch.image[:1])), dim=1)
                    grid = _image_grid(batch, probs, method.images_to_log())
                    writer.add_image("train/input_pred_label_extra", grid, iteration)  # type: ignore[union-attr]

            if val_cases and (iteration % cfg.val_interval == 0 or iteration == cfg.max_iterations):
                if main:
                    with keeping_freed_memory() if keep_some else contextlib.nullcontext():
                        metrics = validate(student, cfg, device)
                    student.train()
                    writer.add_scalar("val/dice", metrics["dice"], iteration)  # type: ignore[union-attr]
                    writer.add_scalar("val/hd95", metrics["hd95"], iteration)  # type: ignore[union-attr]
                    logger.info("iteration %d : val dice %.4f hd95 %.2f", iteration, metrics["dice"], metrics["hd95"])
                    if metrics["dice"] > best["dice"]:
                        best = {"dice": float(metrics["dice"]), "hd95": float(metrics["hd95"]), "iteration": iteration}
                        weights = _cpu_state_dict(student)
                        atomic_torch_save(weights, out / f"{cfg.model}_best_model.pth")
                        atomic_torch_save(weights, out / f"iter_{iteration}_dice_{metrics['dice']:.4f}.pth")
                        logger.info("saved best model (dice %.4f) at iteration %d", metrics["dice"], iteration)
                best = broadcast_object(best, info)  # the other ranks wait here for rank 0's validation
            stopping = stop_after is not None and iteration >= stop_after
            if iteration % cfg.save_interval == 0 or iteration == cfg.max_iterations or stopping:
                if not all(torch.isfinite(p).all() for p in student.parameters()):
                    raise TrainingError(
                        f"non-finite weights after iteration {iteration}; stopped, the last good checkpoint is "
                        f"{latest if latest.is_file() else 'not written yet'} (lower --base_lr?)"
                    )
                rng = gather_objects(_rng_state(), info)  # every rank's RNG states, for an exact resume
                if main:
                    _save_latest(latest, student, method, optimizer, iteration, best, cfg, rng)
            if stopping:
                logger.info("stopped after iteration %d (stop_after)", iteration)
                return {"out_dir": str(out), "iterations": iteration, "best": best, "seconds": time.time() - t0}
    finally:
        if writer is not None:
            writer.close()
        if hasattr(bar, "close"):
            bar.close()

    if not val_cases and main:  # no validation list: the final student is the "best" one
        atomic_torch_save(_cpu_state_dict(student), out / f"{cfg.model}_best_model.pth")
    if seen is not None:
        _dump_rank_state(out, info, student, method, seen)
    seconds = time.time() - t0
    logger.info("finished %d iterations in %.1f s; best val dice %.4f", cfg.max_iterations - start, seconds, best["dice"])
    return {"out_dir": str(out), "iterations": cfg.max_iterations, "best": best, "seconds": seconds}


def _dump_rank_state(out: Path, info: DistInfo, student: nn.Module, method: Method, seen: list[list[str]]) -> None:
    """Testing hook (``UGMCL_DUMP_RANK_STATE=1``): this rank's final weights and the case names of its batches."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(
        {"rank": info.rank, "world_size": info.world_size, "student": student.state_dict(),
         "method": method.state_dict(), "cases": seen},
        out / f"rank{info.rank}_final.pt",
    )


def _progress(steps: range, enabled: bool, cfg: TrainConfig) -> Any:
    if not enabled:
        return steps
    from tqdm import tqdm

    return tqdm(steps, total=cfg.max_iterations, initial=steps.start, ncols=90, desc=cfg.method, file=sys.stderr,
                mininterval=1.0)
