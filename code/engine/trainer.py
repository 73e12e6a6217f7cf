"""The training loop, written once for every method (UG-MCL and the baselines), as a plain sequence of named steps.

``train(cfg)`` reads ``<root>/data/*.h5`` through the split lists, builds the student network and the method
(``methods.METHODS[cfg.method]``), and runs ``cfg.max_iterations`` SGD steps. Outputs go to
``<model_dir>/<exp>_<labeled_num>/<model>/``:

- ``log.txt`` and TensorBoard events (losses, weights, threshold, validation Dice/HD95, image grids),
- ``config.json`` (the full configuration),
- ``<model>_best_model.pth``: the best-validation student as a plain ``state_dict`` (published format), and
  ``<model>_last_model.pth``: the final one (test both, and say which: picking on the test set flatters a method),
- ``checkpoint_latest.pth``: student, method state (teacher), optimiser, iteration, RNG states and config, written
  atomically every ``save_interval`` iterations and at the end; ``--resume`` continues from it.

Nothing is written before the inputs are checked: the data, and on ``--resume`` the checkpoint against the options.

Exact resume: the batch drawn at iteration ``t`` depends only on ``(seed, t)`` (``engine.batches``), and the torch /
numpy / python RNG states are saved, so on CPU in deterministic mode a run of 2N iterations equals a run of N
iterations resumed for N more, bit for bit.

Data-parallel training (``torchrun --nproc_per_node N``) lives in ``engine/distributed.py``: each process draws
its own batches, gradients are averaged, the EMA teacher follows identical students, and rank 0 alone writes the
outputs and validates. Without torchrun nothing changes.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dataloaders.brats2019 import read_split_file
from dataloaders.case_checks import check_split_cases, image_channels
from dataloaders.datasets import dataset_layout
from engine.batches import make_batches
from engine.config import ConfigError, TrainConfig, TrainingError, check_config, described_classes
from engine.distributed import (
    DistInfo,
    broadcast_object,
    cleanup,
    fail_together,
    gather_objects,
    init_distributed,
    mean_over_ranks,
    sync_buffers,
    wrap_model,
)
from engine.run_log import image_grid, logged_losses, logger, progress_bar, setup_logging
from engine.run_state import (
    config_mismatch,
    cpu_state_dict,
    load_latest,
    rank_seed,
    resume_rng,
    rng_state,
    save_latest,
)
from engine.validation import validate
from methods import METHODS
from methods.base import Method
from networks.net_factory_3d import net_factory_3d, width_kwargs
from networks.outputs import segmentation_logits
from speed import CompileError, TrainingSpeed, prepare_training
from utils.atomic import atomic_torch_save, atomic_write_text
from utils.seeding import seed_everything, set_deterministic

__all__ = ["TrainingError", "build_network", "check_config", "check_data", "logged_losses", "run_dir", "train"]

# Testing hook, not a user option: with UGMCL_DUMP_RANK_STATE=1 every rank writes ``rank<r>_final.pt`` (its
# student, method state and the cases it trained on) into the run folder, so a test can compare the ranks.
_DUMP_RANK_STATE = "UGMCL_DUMP_RANK_STATE"


def run_dir(cfg: TrainConfig, model_dir: str | Path = "../model") -> Path:
    """``<model_dir>/<exp>_<labeled_num>/<model>``: the released code's output folder."""
    return Path(model_dir) / f"{cfg.exp}_{cfg.labeled_num}" / str(cfg.model)


def _read_split(cfg: TrainConfig, split: str, required: bool) -> list[str]:
    path = dataset_layout(cfg.dataset).split_path(cfg.root_path, split, cfg.split_dir)
    if not path.is_file():
        if not required:
            return []
        hint = dataset_layout(cfg.dataset).prepare.format(root=cfg.root_path)
        raise TrainingError(f"split list {path} not found for --dataset {cfg.dataset}: {hint}")
    try:
        return read_split_file(path)
    except ValueError as err:  # a name listed twice
        raise TrainingError(str(err)) from err


def check_data(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """Return the train and val case lists after checking the data folder; raise TrainingError if unusable.

    Every listed file is checked once (``dataloaders.case_checks``): it opens and holds an ``image`` and, for the
    labelled training cases and the validation cases, a ``label`` of the same shape; no case is in two lists.
    """
    root = Path(str(cfg.root_path))
    layout = dataset_layout(cfg.dataset)
    if not root.is_dir():
        raise TrainingError(f"data folder {root} not found for --dataset {cfg.dataset}: "
                            + layout.prepare.format(root=root))
    train_cases = _read_split(cfg, "train", required=True)
    unlabeled = _read_split(cfg, "unlabeled", required=False)
    val_cases = _read_split(cfg, "val", required=False)
    train_list = layout.split_path(root, "train", cfg.split_dir)
    if cfg.labeled_num > len(train_cases):
        raise TrainingError(f"--labeled_num {cfg.labeled_num} is larger than the training list {train_list} "
                            f"({len(train_cases)} cases)")
    if METHODS[cfg.method].uses_unlabeled and cfg.labeled_num == len(train_cases) + len(unlabeled):
        raise TrainingError(f"--labeled_num {cfg.labeled_num} leaves no unlabelled case in {train_list} "
                            f"({len(train_cases)} cases); use a smaller --labeled_num or --method supervised")
    splits = {"train": train_cases, "unlabeled": unlabeled, "val": val_cases}
    labelled = set(train_cases[: cfg.labeled_num]) | set(val_cases)
    try:
        check_split_cases(root, {name: cases for name, cases in splits.items() if cases}, labelled=labelled,
                          case_path=lambda name: layout.case_path(root, name))
    except ValueError as err:  # overlapping lists, missing or unreadable files: one line naming them
        raise TrainingError(str(err)) from None
    _check_channels(cfg, layout.case_path(root, train_cases[0]))
    _check_classes(cfg, root / "dataset.json")
    return train_cases, val_cases


def _check_classes(cfg: TrainConfig, description: Path) -> None:
    """Refuse a ``--num_classes`` that differs from the ``num_classes`` of the folder's ``dataset.json``."""
    classes = described_classes(description)
    if classes is not None and cfg.num_classes != classes:
        raise TrainingError(f"--num_classes {cfg.num_classes} does not fit the data: {description} has {classes} classes")


def _check_channels(cfg: TrainConfig, first_case: Path) -> None:
    """Set ``cfg.in_channels`` to the channels of the data's images when it is None, or refuse a value that differs."""
    channels = image_channels(first_case)
    if cfg.in_channels is None:
        cfg.in_channels = channels
        cfg.chosen.append(f"--in_channels {channels} (the channels of {first_case.name})")
    elif cfg.in_channels != channels:
        raise TrainingError(f"--in_channels {cfg.in_channels} does not fit the data: {first_case} holds images of "
                            f"{channels} channel(s)")


def build_network(cfg: TrainConfig) -> nn.Module:
    """The student network named by ``cfg.model``, ``cfg.feature_scale`` times narrower than 64 channels."""
    try:
        kwargs = width_kwargs(str(cfg.model), cfg.feature_scale)
        return net_factory_3d(str(cfg.model), in_chns=cfg.in_channels, class_num=cfg.num_classes, **kwargs)
    except ValueError as err:
        raise TrainingError(str(err)) from err


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.lr_schedule == "poly":
        return cfg.base_lr * (1.0 - step / cfg.max_iterations) ** cfg.poly_power
    if cfg.lr_schedule == "step":
        return cfg.base_lr * cfg.lr_gamma ** (step // cfg.lr_step)
    return cfg.base_lr


def _autocast(device: torch.device, enabled: bool) -> Any:
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


class Trainer:
    """One process's training run: :meth:`run` calls the named steps in order.

    Args:
        cfg: the checked configuration.
        info: this process's rank, world size and device (``engine.distributed.init_distributed``).
        model_dir: parent of the run folder.
        progress: show a progress bar (rank 0).
        stop_after: stop as if killed after this many iterations, with ``checkpoint_latest.pth`` saved.
    """

    def __init__(self, cfg: TrainConfig, info: DistInfo, model_dir: Path, progress: bool,
                 stop_after: int | None) -> None:
        self.cfg, self.info, self.progress, self.stop_after = cfg, info, progress, stop_after
        self.out = run_dir(cfg, model_dir)
        self.latest = self.out / "checkpoint_latest.pth"
        self.start, self.best = 0, {"dice": -1.0, "iteration": 0}
        self.val_cases: list[str] = []
        self.writer: Any = None
        self.seen: list[list[str]] | None = [] if os.environ.get(_DUMP_RANK_STATE) == "1" else None

    # ------------------------------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        """Check, build, resume, then train step by step with validation and checkpoints; return the summary."""
        state = self.check_inputs()
        self.build()
        self.resume(state)
        self.open_outputs()
        t0 = time.time()
        batches = make_batches(self.cfg, self.start, self.info.rank, self.info.world_size, self.seen)
        bar = progress_bar(range(self.start, self.cfg.max_iterations), self.progress and self.info.is_main,
                           self.cfg.max_iterations, self.cfg.method)
        try:
            for step in bar:
                batch = next(batches).to(self.info.device)
                logs = self.train_step(batch, step)
                iteration = step + 1
                self.log_step(batch, logs, iteration, bar)
                self.save_stage_end(step)
                if self.val_cases and (iteration % self.cfg.val_interval == 0 or iteration == self.cfg.max_iterations):
                    self.validate_and_save_best(iteration)
                stopping = self.stop_after is not None and iteration >= self.stop_after
                if iteration % self.cfg.save_interval == 0 or iteration == self.cfg.max_iterations or stopping:
                    self.save_checkpoint(iteration)
                if stopping:
                    logger.info("stopped after iteration %d (stop_after)", iteration)
                    return self.summary(iteration, time.time() - t0)
        finally:
            self.close_outputs(bar)
        self.finish()
        return self.summary(self.cfg.max_iterations, time.time() - t0)

    # ------------------------------------------------------------------------------------------ the steps
    def check_inputs(self) -> dict[str, Any] | None:
        """Check the data and, on ``--resume``, read the checkpoint and check it against the options (rank 0).

        Writes nothing. Returns the checkpoint on rank 0 when resuming, else None.
        """
        state = None
        with fail_together(self.info, lambda: TrainingError("stopped: another process failed while setting up")):
            _, self.val_cases = check_data(self.cfg)  # on every rank: each node needs the data
            if self.cfg.resume and self.info.is_main:
                if not self.latest.is_file():
                    raise TrainingError(f"--resume given but {self.latest} does not exist")
                state = load_latest(self.latest)
                mismatch = config_mismatch(state.get("config", {}), self.cfg)
                if mismatch:
                    raise TrainingError(f"--resume: the options do not fit {self.latest}: {mismatch}; give the "
                                        "checkpoint's values or train into another --exp")
        return state

    def build(self) -> None:
        """Network, speed set-up, DDP wrapper, method (with its teacher), optimiser and gradient scaler."""
        cfg, info = self.cfg, self.info
        seed_everything(cfg.seed)  # the same initial weights on every rank
        set_deterministic(bool(cfg.deterministic))  # 0: cuDNN autotuning (benchmark mode) on CUDA
        self.student = build_network(cfg).to(info.device)
        try:
            self.speed: TrainingSpeed = prepare_training(self.student, cfg.speed, info.device)
        except CompileError as err:
            raise TrainingError(str(err)) from err
        example = torch.zeros(1, cfg.in_channels, *(min(p, 32) for p in cfg.patch_size), device=info.device)
        model = wrap_model(self.student, info, example)  # DDP with several processes, else the student itself
        self.method: Method = METHODS[cfg.method](self.student, cfg, passes=self.speed.passes, forward=model)
        self.speed.compile(self.method.networks())
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=cfg.base_lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        fp16 = cfg.amp and info.device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=fp16)
        if info.rank > 0:  # own dropout and teacher-noise streams; rank 0 keeps the single-process one
            seed_everything(rank_seed(cfg.seed, info.rank))

    def resume(self, state: dict[str, Any] | None) -> None:
        """Load the checkpoint read by :meth:`check_inputs` (broadcast from rank 0) into every part of the run."""
        if not self.cfg.resume:
            return
        state = broadcast_object(state, self.info)
        try:
            self.student.load_state_dict(state["student"])
            self.method.load_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrainingError(f"cannot resume from {self.latest}: it does not fit this run ({first})") from None
        self.start, self.best = int(state["iteration"]), dict(state["best"])
        resume_rng(state, self.cfg, self.info, self.start)

    def open_outputs(self) -> None:
        """The run folder, ``config.json``, ``log.txt`` and the TensorBoard writer (rank 0), once all checks passed."""
        cfg, info = self.cfg, self.info
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        setup_logging(self.out if info.is_main else None)
        logger.info("config: %s", json.dumps(cfg.to_dict()))
        logger.info("device: %s", info.device)
        for note in cfg.chosen + self.speed.notes:
            logger.info("chosen: %s", note)
        if info.is_distributed:
            logger.info("data-parallel: %d processes, %d patches per iteration in all",
                        info.world_size, info.world_size * cfg.batch_size)
        if self.start:
            logger.info("resumed from %s at iteration %d", self.latest, self.start)
        if info.is_main:
            from tensorboardX import SummaryWriter  # imported late: slow import, only needed here

            self.writer = SummaryWriter(str(self.out / "log"))
        self.student.train()

    def train_step(self, batch: Any, step: int) -> dict[str, float]:
        """One SGD step of the method's loss (learning rate of ``step``); returns the logged floats of all ranks."""
        lr = _lr_at(self.cfg, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with _autocast(self.info.device, self.cfg.amp):
            loss, logs = self.method.training_step(batch, step)
        logs = mean_over_ranks({"loss": float(loss.detach()), **logs}, self.info)  # every rank: the same decision
        if not math.isfinite(logs["loss"]):
            raise TrainingError(f"non-finite loss ({logs['loss']}) at iteration {step + 1}; stopped, the last good "
                                f"checkpoint is {self.latest if self.latest.is_file() else 'not written yet'}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        sync_buffers(self.student, self.info)
        self.method.after_optimizer_step(step)
        return {**logs, "lr": lr}

    def log_step(self, batch: Any, logs: dict[str, float], iteration: int, bar: Any) -> None:
        """Scalars, the log line, the progress bar and (every val_interval / 4) an image grid (rank 0)."""
        if not self.info.is_main:
            return
        for key, value in logs.items():
            self.writer.add_scalar(f"train/{key}", value, iteration)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
        logger.info("iteration %d : %s", iteration, ", ".join(f"{k} {v:.6g}" for k, v in logs.items()))
        if iteration % max(1, self.cfg.val_interval // 4) == 0 or iteration == 1:
            with torch.no_grad():
                probs = torch.softmax(segmentation_logits(self.student(batch.image[:1])), dim=1)
            grid = image_grid(batch, probs, self.method.images_to_log())
            self.writer.add_image("train/input_pred_label_extra", grid, iteration)

    def validate_and_save_best(self, iteration: int) -> None:
        """Validate on rank 0 and keep the best student; every rank learns the best from rank 0."""
        if self.info.is_main:
            with self.speed.around_validation():
                metrics = validate(self.student, self.cfg, self.info.device)
            self.student.train()
            self.writer.add_scalar("val/dice", metrics["dice"], iteration)
            self.writer.add_scalar("val/hd95", metrics["hd95"], iteration)
            logger.info("iteration %d : val dice %.4f hd95 %.2f", iteration, metrics["dice"], metrics["hd95"])
            if metrics["dice"] > self.best["dice"]:
                self.save_best(metrics, iteration)
        self.best = broadcast_object(self.best, self.info)  # the other ranks wait here for rank 0's validation

    def save_best(self, metrics: dict[str, float], iteration: int) -> None:
        """``<model>_best_model.pth`` and ``iter_<n>_dice_<d>.pth``: the student as a plain CPU ``state_dict``."""
        self.best = {"dice": float(metrics["dice"]), "hd95": float(metrics["hd95"]), "iteration": iteration}
        weights = cpu_state_dict(self.student)
        atomic_torch_save(weights, self.out / f"{self.cfg.model}_best_model.pth")
        atomic_torch_save(weights, self.out / f"iter_{iteration}_dice_{metrics['dice']:.4f}.pth")
        logger.info("saved best model (dice %.4f) at iteration %d", metrics["dice"], iteration)

    def save_stage_end(self, step: int) -> None:
        """``<model>_<stage>_model.pth`` after the last iteration of a stage that another stage follows (rank 0)."""
        stage = self.method.stage(step)
        if step + 1 < self.cfg.max_iterations and self.method.stage(step + 1) != stage and self.info.is_main:
            atomic_torch_save(cpu_state_dict(self.student), self.out / f"{self.cfg.model}_{stage}_model.pth")
            logger.info("saved the %s stage's model at iteration %d", stage, step + 1)

    def save_checkpoint(self, iteration: int) -> None:
        """``checkpoint_latest.pth`` with every rank's RNG states, after checking the weights are finite."""
        if not all(torch.isfinite(p).all() for p in self.student.parameters()):
            raise TrainingError(f"non-finite weights after iteration {iteration}; stopped, the last good checkpoint "
                                f"is {self.latest if self.latest.is_file() else 'not written yet'} (lower --base_lr?)")
        rng = gather_objects(rng_state(), self.info)
        if self.info.is_main:
            save_latest(self.latest, self.student, self.method, self.optimizer, iteration, self.best, self.cfg, rng)

    def finish(self) -> None:
        """``<model>_last_model.pth`` (the final student; also the "best" one without a validation list) and the
        testing hook's per-rank dump."""
        if self.info.is_main:
            weights = cpu_state_dict(self.student)
            atomic_torch_save(weights, self.out / f"{self.cfg.model}_last_model.pth")
            if not self.val_cases:
                atomic_torch_save(weights, self.out / f"{self.cfg.model}_best_model.pth")
        if self.seen is not None:
            atomic_torch_save({"rank": self.info.rank, "world_size": self.info.world_size,
                               "student": self.student.state_dict(), "method": self.method.state_dict(),
                               "cases": self.seen}, self.out / f"rank{self.info.rank}_final.pt")

    def close_outputs(self, bar: Any) -> None:
        if self.writer is not None:
            self.writer.close()
        if hasattr(bar, "close"):
            bar.close()

    def summary(self, iterations: int, seconds: float) -> dict[str, Any]:
        if iterations == self.cfg.max_iterations:
            logger.info("finished %d iterations in %.1f s; best val dice %.4f", iterations - self.start, seconds,
                        self.best["dice"])
        return {"out_dir": str(self.out), "iterations": iterations, "best": self.best, "seconds": seconds}


def train(cfg: TrainConfig, model_dir: str | Path = "../model", progress: bool = True,
          stop_after: int | None = None) -> dict[str, Any]:
    """Train ``cfg.method`` and return a summary (``best``, ``iterations``, ``out_dir``, ``seconds``).

    Started by ``torchrun`` with ``WORLD_SIZE`` > 1, every process runs this function: the training is
    data-parallel (``engine/distributed.py``) and every rank returns the same summary.

    Args:
        cfg: the configuration.
        model_dir: parent of the run folder (``<model_dir>/<exp>_<labeled_num>/<model>``).
        progress: show a tqdm bar (rank 0 only).
        stop_after: stop (as if killed) after this many iterations, having saved ``checkpoint_latest.pth``;
            the schedule still follows ``cfg.max_iterations``. Used to test exact resume.

    Raises:
        TrainingError: bad options or device, missing data, an unreadable or unfitting checkpoint or a non-finite
            loss (on every rank when any rank meets it).
    """
    check_config(cfg)
    try:
        info = init_distributed(cfg.device)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    finished = False
    try:
        summary = Trainer(cfg, info, Path(model_dir), progress, stop_after).run()
        finished = True
        return summary
    finally:
        cleanup(info, synchronize=finished)
