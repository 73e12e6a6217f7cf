"""Training configuration: one dataclass, defaults = the released UG-MCL code (SPEC section 3)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Tuple

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    # data
    root_path: str = "../data/BraTS2019"
    exp: str = "BraTs2019_UGMCL"
    model: str = "unet_3D_dt"
    method: str = "ugmcl"
    variant: str = "released"  # "released" (default, published code) or "paper" (separate SDF head, GT SDF, beta)
    labeled_num: int = 50
    patch_size: Tuple[int, int, int] = (96, 96, 96)
    in_channels: int = 1
    num_classes: int = 2
    feature_scale: int = 4
    # optimisation
    max_iterations: int = 30000
    batch_size: int = 4
    labeled_bs: int = 2
    base_lr: float = 0.01
    lr_schedule: str = "constant"  # "constant" (released) or "poly": lr * (1 - t/T)^poly_power
    poly_power: float = 0.9
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
    mc_chunk: int = 2  # teacher passes per forward, as released (0 = all T at once: faster, more memory)
    noise_std: float = 0.1
    noise_clip: float = 0.2
    threshold_start: float = 0.75  # tau(t) = (start + (end - start) * rampup(t, threshold_rampup)) * ln 2
    threshold_end: float = 1.0
    threshold_rampup: int | None = None  # None: max_iterations (as released)
    sdf_k: float = 1500.0
    beta: float = 0.75  # paper variant: beta * seg consistency + (1 - beta) * SDF consistency
    consistency_rows: str = "released"  # baselines: rows of the unsupervised term ("released", "all", "unlabeled")
    dtc_sdf_weight: float = 0.3  # DTC: weight of the SDF regression in the supervised loss
    # run control
    val_interval: int = 200
    save_interval: int = 200
    num_workers: int = 4
    device: str = "auto"
    amp: bool = False
    fast_network: bool = False  # CPU: fused InstanceNorm + ReLU, channels_last_3d (U-Nets): ~1.45x, not bit-exact
    low_memory: int = 1  # UG-MCL: teacher first, B rows per forward (~1/3 the memory; CPU: released losses)
    keep_freed_memory: int = 2  # CPU, utils.allocator: glibc keeps freed blocks in the teacher's passes and the
    # validations (2), always (1: fastest, most RSS) or never (0)
    compile: int = 0  # torch.compile the student's and teacher's forwards (CUDA; the first iterations compile)
    resume: bool = False
    stride_xy: int = 64
    stride_z: int = 64
    sw_batch: int = 1
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d
