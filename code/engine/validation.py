"""Validation during training: the test route (``engine.prediction.predict_case``) over the val cases, mean Dice
and HD95."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from dataloaders.brats2019 import CaseDataset
from engine.config import TrainConfig
from engine.prediction import SlidingWindow, predict_case
from utils.metrics import dice, hd95

__all__ = ["validate"]


def validate(net: nn.Module, cfg: TrainConfig, device: torch.device, split: str = "val") -> dict[str, float]:
    """Mean Dice and HD95 (voxels) of ``net`` over the ``split`` list of ``cfg.dataset``, with the sliding window of
    testing (foreground = every class > 0).

    An empty prediction counts as Dice 0 and its HD95 as NaN (left out of the HD95 mean, never 0: the
    released code scored it as a perfect 0).
    """
    dataset = CaseDataset(cfg.root_path, split, layout=cfg.dataset, split_dir=cfg.split_dir)
    window = SlidingWindow(cfg.patch_size, cfg.stride_xy, cfg.stride_z, cfg.sw_batch, amp=cfg.amp)
    net.eval()
    dices, hds = [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        image = torch.as_tensor(np.asarray(sample["image"], dtype=np.float32))
        label = np.asarray(sample["label"]) > 0
        pred, _, _ = predict_case(net, image.to(device), window, device)
        pred = pred > 0
        dices.append(dice(pred, label))
        hds.append(hd95(pred, label))
    finite = [h for h in hds if not math.isnan(h)]
    return {
        "dice": float(np.mean(dices)) if dices else float("nan"),
        "hd95": float(np.mean(finite)) if finite else float("nan"),
        "n_hd95_nan": float(len(hds) - len(finite)),
    }
