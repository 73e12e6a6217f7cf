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
"""

from __future__ import annotations

import json
import logging
import random
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

from dataloaders.brats2019 import BraTS2019
from dataloaders.samplers import TwoStreamBatchSampler
from dataloaders.transforms import RandomCrop, RandomRotFlip, ToTensor
from engine.config import TrainConfig
from engine.validation import validate
from methods import METHODS
from methods.base import Batch, Method
from networks.net_factory_3d import net_factory_3d
from utils.atomic import atomic_torch_save, atomic_write_text
from utils.device import get_device
from utils.seeding import seed_everything, set_deterministic

__all__ = ["TrainingError", "build_network", "check_config", "run_dir", "train"]

logger = logging.getLogger("ugmcl")


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
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


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


def _batch_plan(labeled: list[int], unlabeled: list[int], cfg: TrainConfig, start: int) -> Iterator[list[tuple[int, int]]]:
    """Endless list of ``[(index, sample_seed), ...]`` batches, from iteration ``start`` on.

    Passes of the two-stream sampler are seeded by ``(seed, pass)``; sample seeds by ``(seed, t, slot)``.
    """
    secondary = cfg.batch_size - cfg.labeled_bs if unlabeled else 0
    sampler = TwoStreamBatchSampler(labeled, unlabeled, cfg.batch_size, secondary, seed=cfg.seed) if secondary else None
    step = 0
    for epoch in range(10**9):
        if sampler is not None:
            sampler.set_epoch(epoch)
            batches: Iterator[list[int]] = iter(sampler)
        else:  # labelled data only: one permutation per pass, incomplete last batch dropped
            order = np.random.default_rng([cfg.seed, epoch]).permutation(labeled)
            n = len(order) - len(order) % cfg.labeled_bs
            batches = (list(order[i : i + cfg.labeled_bs]) for i in range(0, n, cfg.labeled_bs))
        for indices in batches:
            if step >= start:
                seeds = np.random.SeedSequence([cfg.seed, step]).generate_state(len(indices))
                yield [(int(i), int(s)) for i, s in zip(indices, seeds)]
            step += 1


def make_batches(cfg: TrainConfig, start: int) -> Iterator[Batch]:
    """The training batches from iteration ``start`` (labelled rows first), on the CPU."""
    dataset = BraTS2019(
        cfg.root_path, split="train", transform=_train_transform(cfg.patch_size)
    )
    n = len(dataset)
    labeled = list(range(cfg.labeled_num))
    unlabeled = list(range(cfg.labeled_num, n)) if METHODS[cfg.method].uses_unlabeled else []
    loader = DataLoader(
        _SeededSamples(dataset),
        batch_sampler=_batch_plan(labeled, unlabeled, cfg, start),  # type: ignore[arg-type]
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global torch RNG untouched
    )
    for sample in loader:
        yield Batch(sample["image"], sample["label"].long(), cfg.labeled_bs)


def _train_transform(patch: tuple[int, int, int]) -> Any:
    rot_flip, crop, to_tensor = RandomRotFlip(), RandomCrop(tuple(patch)), ToTensor()

    def transform(sample: dict[str, Any]) -> dict[str, Any]:
        return to_tensor(crop(rot_flip(sample)))

    return transform


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
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_latest(path: Path, student: nn.Module, method: Method, optimizer: torch.optim.Optimizer,
                 step: int, best: dict[str, float], cfg: TrainConfig) -> None:
    atomic_torch_save(
        {
            "student": student.state_dict(),
            "method": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "iteration": step,
            "best": best,
            "rng": _rng_state(),
            "config": cfg.to_dict(),
        },
        path,
    )


def _load_latest(path: Path, device: torch.device) -> dict[str, Any]:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read is reported the same way
        raise TrainingError(f"cannot resume from {path}: {type(err).__name__}: {err}") from err


# ----------------------------------------------------------------------------------------------
# logging
# ----------------------------------------------------------------------------------------------
def _setup_logging(out: Path) -> None:
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("[%(asctime)s.%(msecs)03d] %(message)s", datefmt="%H:%M:%S")
    file_handler = logging.FileHandler(out / "log.txt")
    file_handler.setFormatter(fmt)
    logger.addHandler(file_handler)
    logger.propagate = False


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

    Args:
        cfg: the configuration.
        model_dir: parent of the run folder (``<model_dir>/<exp>_<labeled_num>/<model>``).
        progress: show a tqdm bar.
        stop_after: stop (as if killed) after this many iterations, having saved ``checkpoint_latest.pth``;
            the schedule still follows ``cfg.max_iterations``. Used to test exact resume.

    Raises:
        TrainingError: bad options, missing data, an unreadable checkpoint or a non-finite loss.
    """
    check_config(cfg)
    _, val_cases = check_data(cfg)
    device = get_device(cfg.device)
    out = run_dir(cfg, model_dir)
    out.mkdir(parents=True, exist_ok=True)
    _setup_logging(out)
    atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    logger.info("config: %s", json.dumps(cfg.to_dict()))
    logger.info("device: %s", device)

    seed_everything(cfg.seed)
    if cfg.deterministic:
        set_deterministic(True)
    student = build_network(cfg).to(device)
    if device.type == "cuda":
        student = student.to(memory_format=torch.channels_last_3d)
    method = METHODS[cfg.method](student, cfg)
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported())

    start, best = 0, {"dice": -1.0, "iteration": 0}
    latest = out / "checkpoint_latest.pth"
    if cfg.resume:
        if not latest.is_file():
            raise TrainingError(f"--resume given but {latest} does not exist")
        state = _load_latest(latest, device)
        student.load_state_dict(state["student"])
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        start, best = int(state["iteration"]), dict(state["best"])
        _set_rng_state(state["rng"])
        logger.info("resumed from %s at iteration %d", latest, start)

    from tensorboardX import SummaryWriter  # imported late: slow import, only needed here

    writer = SummaryWriter(str(out / "log"))
    batches = make_batches(cfg, start)
    student.train()
    bar = _progress(range(start, cfg.max_iterations), progress, cfg)
    t0 = time.time()
    step = start
    try:
        for step in bar:
            lr = _lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches).to(device)
            with _autocast(device, cfg.amp):
                loss, logs = method.training_step(batch, step)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"non-finite loss ({loss.item()}) at iteration {step + 1}; stopped, the last good checkpoint "
                    f"is {latest if latest.is_file() else 'not written yet'}"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            method.after_optimizer_step(step)
            iteration = step + 1

            logs = {"loss": float(loss.detach()), **logs, "lr": lr}
            for key, value in logs.items():
                writer.add_scalar(f"train/{key}", value, iteration)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{logs['loss']:.4f}")
            logger.info("iteration %d : %s", iteration, ", ".join(f"{k} {v:.6g}" for k, v in logs.items()))
            if iteration % max(1, cfg.val_interval // 4) == 0 or iteration == 1:
                with torch.no_grad():
                    probs = torch.softmax(_seg_logits(student(batch.image[:1])), dim=1)
                writer.add_image("train/input_pred_label_extra", _image_grid(batch, probs, method.images_to_log()), iteration)

            if val_cases and (iteration % cfg.val_interval == 0 or iteration == cfg.max_iterations):
                metrics = validate(student, cfg, device)
                student.train()
                writer.add_scalar("val/dice", metrics["dice"], iteration)
                writer.add_scalar("val/hd95", metrics["hd95"], iteration)
                logger.info("iteration %d : val dice %.4f hd95 %.2f", iteration, metrics["dice"], metrics["hd95"])
                if metrics["dice"] > best["dice"]:
                    best = {"dice": float(metrics["dice"]), "hd95": float(metrics["hd95"]), "iteration": iteration}
                    atomic_torch_save(student.state_dict(), out / f"{cfg.model}_best_model.pth")
                    atomic_torch_save(student.state_dict(), out / f"iter_{iteration}_dice_{metrics['dice']:.4f}.pth")
                    logger.info("saved best model (dice %.4f) at iteration %d", metrics["dice"], iteration)
            stopping = stop_after is not None and iteration >= stop_after
            if iteration % cfg.save_interval == 0 or iteration == cfg.max_iterations or stopping:
                if not all(torch.isfinite(p).all() for p in student.parameters()):
                    raise TrainingError(
                        f"non-finite weights after iteration {iteration}; stopped, the last good checkpoint is "
                        f"{latest if latest.is_file() else 'not written yet'} (lower --base_lr?)"
                    )
                _save_latest(latest, student, method, optimizer, iteration, best, cfg)
            if stopping:
                logger.info("stopped after iteration %d (stop_after)", iteration)
                return {"out_dir": str(out), "iterations": iteration, "best": best, "seconds": time.time() - t0}
    finally:
        writer.close()
        if hasattr(bar, "close"):
            bar.close()

    if not val_cases:  # no validation list: the final student is the "best" one
        atomic_torch_save(student.state_dict(), out / f"{cfg.model}_best_model.pth")
    seconds = time.time() - t0
    logger.info("finished %d iterations in %.1f s; best val dice %.4f", cfg.max_iterations - start, seconds, best["dice"])
    return {"out_dir": str(out), "iterations": cfg.max_iterations, "best": best, "seconds": seconds}


def _seg_logits(output: Any) -> torch.Tensor:
    return output[-1] if isinstance(output, (tuple, list)) else output


def _progress(steps: range, enabled: bool, cfg: TrainConfig) -> Any:
    if not enabled:
        return steps
    from tqdm import tqdm

    return tqdm(steps, total=cfg.max_iterations, initial=steps.start, ncols=90, desc=cfg.method, file=sys.stderr,
                mininterval=1.0)
