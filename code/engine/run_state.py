"""What a run saves and restores for an exact resume: ``checkpoint_latest.pth``, RNG states, published weights."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.config import TrainConfig, TrainingError
from engine.distributed import DistInfo
from engine.run_log import logger
from methods.base import Method
from utils.atomic import atomic_torch_save
from utils.seeding import seed_everything

__all__ = ["NETWORK_OPTIONS", "config_mismatch", "cpu_state_dict", "load_latest", "rank_seed", "resume_rng",
           "rng_state", "save_latest"]

NETWORK_OPTIONS = ("method", "model", "variant", "feature_scale", "in_channels", "num_classes")
"""Options a resumed run must share with its checkpoint: they decide the networks' and the method's state."""


def config_mismatch(saved: dict[str, Any], cfg: TrainConfig) -> str | None:
    """A one-line description of the :data:`NETWORK_OPTIONS` where ``cfg`` differs from a checkpoint's config."""
    current = cfg.to_dict()
    differing = [f"--{k} {current[k]} (checkpoint: {saved[k]})" for k in NETWORK_OPTIONS
                 if k in saved and saved[k] != current[k]]
    return ", ".join(differing) or None


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_latest(path: Path, student: nn.Module, method: Method, optimizer: torch.optim.Optimizer,
                 step: int, best: dict[str, float], cfg: TrainConfig, rng: list[dict[str, Any]] | None = None) -> None:
    """Write ``checkpoint_latest.pth``; ``rng`` holds every rank's RNG states (default: this process's).

    With several ranks, ``rng`` is rank 0's and ``rng_per_rank`` all of them (with ``world_size``).
    """
    rng = [rng_state()] if rng is None else rng
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


def cpu_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """``net.state_dict()`` with every tensor on the CPU: a published-format file that plain ``torch.load`` opens
    on a machine without the GPU it was trained on."""
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def load_latest(path: Path) -> dict[str, Any]:
    """``checkpoint_latest.pth`` with every tensor on the CPU: ``load_state_dict`` copies weights and optimizer
    state to the model's device, and the RNG setters take CPU byte tensors only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read is reported the same way
        raise TrainingError(f"cannot resume from {path}: {type(err).__name__}: {err}") from err


def rank_seed(seed: int, rank: int, start: int = 0) -> int:
    """Seed of the dropout / noise streams of rank > 0 (rank 0 keeps the single-process stream of ``seed``)."""
    return int(np.random.SeedSequence([seed, rank, start]).generate_state(1)[0])


def resume_rng(state: dict[str, Any], cfg: TrainConfig, info: DistInfo, start: int) -> None:
    """Restore this rank's RNG states; with another number of processes than saved, rank r > 0 reseeds."""
    per_rank = state.get("rng_per_rank") or [state["rng"]]
    if len(per_rank) == info.world_size:
        set_rng_state(per_rank[info.rank])
        return
    logger.info("resuming %d process(es) from a checkpoint of %d: batches and random streams differ from an "
                "uninterrupted run from here on", info.world_size, len(per_rank))
    if info.is_main:
        set_rng_state(state["rng"])
    else:
        seed_everything(rank_seed(cfg.seed, info.rank, start))
