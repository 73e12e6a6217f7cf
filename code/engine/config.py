"""Training configuration: one dataclass whose defaults are the released UG-MCL code (SPEC section 3), checked in
one place (:func:`check_config`: the ranges of every numeric option, then the method's own rules)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Tuple

from dataloaders.datasets import DATASETS
from speed import SpeedOptions

__all__ = ["ConfigError", "TrainConfig", "TrainingError", "check_config", "check_ranges", "default_stride",
           "described_classes"]


class TrainingError(RuntimeError):
    """A problem with the inputs or the run that stops training with a one-line message."""


class ConfigError(TrainingError, ValueError):
    """An option value or combination that training cannot use; the message names the option."""


def described_classes(description: Path) -> int | None:
    """The ``num_classes`` of a data folder's ``dataset.json`` (written by ``prepare_dataset.py``), or None."""
    try:
        return int(json.loads(description.read_text())["num_classes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def default_stride(side: int) -> int:
    """The sliding-window stride used when none is given: two thirds of the patch side (64 for 96)."""
    return max(1, (2 * int(side)) // 3)


@dataclass
class TrainConfig:
    """Every training option; ``None`` where a default follows from other options (resolved on construction).

    ``root_path``, ``exp``, ``labeled_num``, ``patch_size``, ``max_iterations``, ``lr_schedule`` (and on some datasets
    the strides) None: the defaults of ``dataset`` (``dataloaders.datasets``; for ``brats2019`` the released code's).
    ``model`` None: the network the method needs (``Method.model_for``: ``vnet_dt`` for DTC and the paper variant,
    ``unet_3D_ds`` for URPC, else ``unet_3D_dt``, or the dataset's backbone). ``stride_xy`` / ``stride_z`` None: two
    thirds of the patch (:func:`default_stride`). ``threshold_rampup`` None: ``max_iterations`` (as released).
    """

    # data
    dataset: str = "brats2019"  # a layout of dataloaders.datasets: where the files are, and the papers' defaults
    root_path: str | None = None
    split_dir: str | None = None  # folder of the split lists, when not root_path
    exp: str | None = None
    model: str | None = None
    method: str = "ugmcl"
    variant: str = "released"  # "released" (published code) or "paper" (separate SDF head, GT SDF, beta)
    labeled_num: int | None = None
    patch_size: Tuple[int, int, int] | None = None
    in_channels: int | None = None  # None: the channels of the data's images (read by the trainer)
    num_classes: int | None = None  # None: the num_classes of <root>/dataset.json (prepare_dataset.py), else 2
    feature_scale: int = 4
    # optimisation
    max_iterations: int | None = None
    batch_size: int = 4
    labeled_bs: int = 2
    base_lr: float = 0.01
    lr_schedule: str | None = None  # "constant" (released), "poly": lr (1 - t/T)^poly_power, "step": lr gamma^(t // step)
    poly_power: float = 0.9
    lr_step: int = 2500
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 1337
    deterministic: int = 1
    # teacher and consistency
    ema_decay: float = 0.99
    consistency: float = 0.1
    consistency_rampup: float = 200.0
    consistency_interval: int = 150  # the weight ramp advances once every this many iterations (t // 150)
    mc_passes: int = 8  # T
    mc_chunk: int = 2  # teacher passes per forward, as released (0 = all T at once)
    low_memory: int = 1  # UG-MCL: teacher passes first, B rows per forward (1) or the released order (0)
    noise_std: float = 0.1
    noise_clip: float = 0.2
    threshold_start: float = 0.75  # tau(t) = (start + (end - start) * rampup(t, threshold_rampup)) * ln 2
    threshold_end: float = 1.0
    threshold_rampup: int | None = None
    sdf_k: float = 1500.0
    beta: float = 0.75  # paper variant: beta * seg consistency + (1 - beta) * SDF consistency
    consistency_rows: str = "released"  # baselines: rows of the unsupervised term ("released", "all", "unlabeled")
    dtc_sdf_weight: float = 0.3  # DTC: weight of the SDF regression in the supervised loss
    bcp_pretrain_iterations: int = 2000  # BCP: copy-paste pre-training iterations before the self-training
    bcp_u_weight: float = 0.5  # BCP: loss weight alpha of the voxels that come from an unlabelled image
    bcp_mask_ratio: float = 2 / 3  # BCP: side of the pasted cuboid / side of the patch, on each axis
    bcp_largest_cc: int = 1  # BCP: keep the largest connected component of each pseudo-label class
    # run control
    val_interval: int = 200
    save_interval: int = 200
    num_workers: int = 4
    device: str = "auto"
    amp: bool = False
    resume: bool = False
    stride_xy: int | None = None
    stride_z: int | None = None
    sw_batch: int = 1
    speed: SpeedOptions = field(default_factory=SpeedOptions)

    def __post_init__(self) -> None:
        if isinstance(self.speed, dict):
            self.speed = SpeedOptions(**self.speed)
        self.chosen: list[str] = []  # what was filled in, for the log (not a field: not saved)
        layout = DATASETS.get(self.dataset)
        if layout is not None:
            filled = [key for key, value in layout.defaults.items() if getattr(self, key) is None]
            for key in filled:
                setattr(self, key, layout.defaults[key])
            if filled and self.dataset != "brats2019":
                self.chosen.append(f"the defaults of --dataset {self.dataset} for {', '.join('--' + k for k in filled)}"
                                   f" ({layout.source})")
        if self.num_classes is None:
            described = described_classes(Path(self.root_path) / "dataset.json") if self.root_path else None
            self.num_classes = described if described is not None else 2
            if described is not None:
                self.chosen.append(f"--num_classes {described} (the labels of {Path(self.root_path) / 'dataset.json'})")
        if self.patch_size is not None:
            self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        if self.model is None:
            from methods import METHODS  # methods import this module for their types only

            method = METHODS.get(self.method)
            usual = method.model_for(self) if method is not None else "unet_3D_dt"
            self.model = layout.models.get(usual, usual) if layout is not None else usual
            self.chosen.append(f"--model {self.model} (the network --method {self.method} needs on {self.dataset})")
        if self.patch_size is not None and len(self.patch_size) == 3:
            if self.stride_xy is None:
                self.stride_xy = default_stride(min(self.patch_size[:2]))
                self.chosen.append(f"--stride_xy {self.stride_xy} (two thirds of the patch)")
            if self.stride_z is None:
                self.stride_z = default_stride(self.patch_size[2])
                self.chosen.append(f"--stride_z {self.stride_z} (two thirds of the patch)")

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON values (``patch_size`` a list, ``speed`` a dict)."""
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d


# (option, lowest, highest, lowest allowed itself, highest allowed itself); None = unbounded
_RANGES: tuple[tuple[str, float | None, float | None, bool, bool], ...] = (
    ("labeled_num", 1, None, True, True),
    ("in_channels", 1, None, True, True),
    ("num_classes", 2, 256, True, True),
    ("feature_scale", 1, 64, True, True),
    ("max_iterations", 1, None, True, True),
    ("batch_size", 1, None, True, True),
    ("labeled_bs", 1, None, True, True),
    ("base_lr", 0, None, False, True),
    ("poly_power", 0, None, False, True),
    ("lr_step", 1, None, True, True),
    ("lr_gamma", 0, 1, False, True),
    ("momentum", 0, 1, True, False),
    ("weight_decay", 0, None, True, True),
    ("seed", 0, 2**32 - 1, True, True),
    ("deterministic", 0, 1, True, True),
    ("ema_decay", 0, 1, True, True),
    ("consistency", 0, None, True, True),
    ("consistency_rampup", 0, None, True, True),
    ("consistency_interval", 1, None, True, True),
    ("mc_passes", 1, None, True, True),
    ("mc_chunk", 0, None, True, True),
    ("low_memory", 0, 1, True, True),
    ("noise_std", 0, None, True, True),
    ("noise_clip", 0, None, True, True),
    ("threshold_start", 0, None, True, True),
    ("threshold_end", 0, None, True, True),
    ("threshold_rampup", 0, None, True, True),
    ("sdf_k", 0, None, False, True),
    ("beta", 0, 1, True, True),
    ("dtc_sdf_weight", 0, None, True, True),
    ("bcp_pretrain_iterations", 0, None, True, True),
    ("bcp_u_weight", 0, None, True, True),
    ("bcp_mask_ratio", 0, 1, False, True),
    ("bcp_largest_cc", 0, 1, True, True),
    ("val_interval", 1, None, True, True),
    ("save_interval", 1, None, True, True),
    ("num_workers", 0, None, True, True),
    ("sw_batch", 1, None, True, True),
)


def _range_text(low: float | None, high: float | None, low_in: bool, high_in: bool) -> str:
    left = "(-inf" if low is None else ("[" if low_in else "(") + f"{low:g}"
    right = "inf)" if high is None else f"{high:g}" + ("]" if high_in else ")")
    return f"{left}, {right}"


def check_ranges(cfg: TrainConfig) -> None:
    """Check that every numeric option is a finite number in its range.

    Raises:
        ConfigError: naming the option, its value and the range.
    """
    for name, low, high, low_in, high_in in _RANGES:
        value = getattr(cfg, name)
        if value is None and name in ("threshold_rampup", "in_channels"):  # None: max_iterations / read from the data
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (low is None or value > low or (low_in and value == low))
        ok = ok and (high is None or value < high or (high_in and value == high))
        if not ok:
            raise ConfigError(f"--{name} must be in {_range_text(low, high, low_in, high_in)}, got {value!r}")
    if cfg.lr_schedule not in ("constant", "poly", "step"):
        raise ConfigError(f"--lr_schedule must be 'constant', 'poly' or 'step', got {cfg.lr_schedule!r}")


def check_config(cfg: TrainConfig) -> None:
    """Reject impossible options before anything is built: the method's :meth:`~methods.base.Method.check_config`
    (which checks the ranges first), the patch and strides, and a batch that leaves room for unlabelled patches.

    Raises:
        ConfigError: naming the option, what was expected and what was found.
    """
    from methods import METHODS

    if cfg.dataset not in DATASETS:
        raise ConfigError(f"unknown --dataset {cfg.dataset!r}; choose one of {sorted(DATASETS)}")
    method = METHODS.get(cfg.method)
    if method is None:
        raise ConfigError(f"unknown --method {cfg.method!r}; choose one of {sorted(METHODS)}")
    try:
        method.check_config(cfg)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err
    if len(cfg.patch_size) != 3 or any(p <= 0 or p % 16 for p in cfg.patch_size):
        raise ConfigError(f"--patch_size must be three positive multiples of 16, got {list(cfg.patch_size)}")
    px, py, pz = cfg.patch_size
    for name, stride, side in (("stride_xy", cfg.stride_xy, min(px, py)), ("stride_z", cfg.stride_z, pz)):
        if not isinstance(stride, int) or not 0 < stride <= side:
            raise ConfigError(f"--{name} must be in [1, {side}] for the patch {list(cfg.patch_size)} (larger strides "
                              f"leave gaps between the sliding windows), got {stride!r}")
    if cfg.labeled_num < cfg.labeled_bs:
        raise ConfigError(f"--labeled_num ({cfg.labeled_num}) is smaller than --labeled_bs ({cfg.labeled_bs})")
    if method.uses_unlabeled and cfg.batch_size <= cfg.labeled_bs:
        raise ConfigError(f"--batch_size ({cfg.batch_size}) must be larger than --labeled_bs ({cfg.labeled_bs}): "
                          "the rest of the batch holds the unlabelled patches")
