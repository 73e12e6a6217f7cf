"""Training batches: the batch of iteration ``t`` depends only on ``(seed, t)``, so a resumed run is exact.

Each sample's augmentation gets its own seed, independent of the worker count and order. With ``world_size``
processes, iteration ``t`` of rank ``r`` is batch ``t * world_size + r`` of one plan.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dataloaders.brats2019 import CaseDataset, read_split_file
from dataloaders.datasets import dataset_layout
from dataloaders.samplers import TwoStreamBatchSampler
from dataloaders.transforms import Compose, RandomRotFlipCrop, ToTensor
from engine.config import TrainConfig
from methods import METHODS
from methods.base import Batch

__all__ = ["UNLABELLED", "make_batches", "training_cases"]

UNLABELLED = -1
"""The label value of every voxel of an unlabelled row (its label is never read, and no loss uses it)."""


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
            sample = self.dataset[index]
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        if "label" not in sample:  # an unlabelled case: its label is never read, the row holds UNLABELLED
            sample["label"] = torch.full(tuple(sample["image"].shape[-3:]), UNLABELLED, dtype=torch.int64)
        return sample


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
    on the CPU; the case names of each batch are appended to ``seen`` when given.

    The cases are the train list, then the ``unlabeled`` list (``engine.trainer.check_data``); the first
    ``labeled_num`` are labelled, and the others' labels are never read (their rows hold ``UNLABELLED``).
    """
    cases = training_cases(cfg)
    dataset = CaseDataset(cfg.root_path, "train", transform=_train_transform(cfg.patch_size), layout=cfg.dataset,
                          names=cases, labelled=cfg.labeled_num)
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


def training_cases(cfg: TrainConfig) -> list[str]:
    """The train list followed by the ``unlabeled`` list (when the layout has one and it exists)."""
    layout = dataset_layout(cfg.dataset)
    train = read_split_file(layout.split_path(cfg.root_path, "train", cfg.split_dir))
    unlabeled_file = layout.split_path(cfg.root_path, "unlabeled", cfg.split_dir)
    return train + (read_split_file(unlabeled_file) if unlabeled_file.is_file() else [])


def _train_transform(patch: tuple[int, int, int]) -> Any:
    """The released augmentation, rot90/flip then a random crop, reading only the patch's box (same draws)."""
    return Compose([RandomRotFlipCrop(tuple(patch)), ToTensor()])
