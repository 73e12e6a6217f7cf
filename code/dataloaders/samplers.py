"""Batch sampler that mixes labelled and unlabelled cases in every batch (Mean Teacher / UA-MT / UG-MCL).

Each batch is ``primary_batch_size`` labelled indices followed by ``secondary_batch_size`` unlabelled ones, so a
method can take the first ``labeled_bs`` rows as the supervised part.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Iterator, Sequence
from typing import List, Union

import numpy as np
from torch.utils.data import Sampler

__all__ = ["TwoStreamBatchSampler", "grouper", "iterate_eternally", "iterate_once"]

RandomSource = Union[np.random.Generator, np.random.RandomState, None]


def _permutation(indices: Sequence[int], rng: RandomSource) -> List[int]:
    source = np.random if rng is None else rng
    return [int(i) for i in source.permutation(indices)]


def iterate_once(indices: Sequence[int], rng: RandomSource = None) -> List[int]:
    """One random permutation of ``indices`` (global ``np.random`` when ``rng`` is None)."""
    return _permutation(indices, rng)


def iterate_eternally(indices: Sequence[int], rng: RandomSource = None) -> Iterator[int]:
    """Endless chain of independent random permutations of ``indices``, each drawn when the previous one ends."""

    def shuffles() -> Iterator[List[int]]:
        while True:
            yield _permutation(indices, rng)

    return itertools.chain.from_iterable(shuffles())


def grouper(iterable: Iterable[int], n: int) -> Iterator[tuple]:
    """Consecutive, non-overlapping n-tuples; an incomplete last group is dropped."""
    args = [iter(iterable)] * n
    return zip(*args)


def _as_index_list(indices: Iterable[int], name: str) -> List[int]:
    try:
        return [operator.index(i) for i in indices]
    except TypeError:
        raise ValueError(f"{name} must be a sequence of ints, found {indices!r}") from None


class TwoStreamBatchSampler(Sampler):
    """Batches of ``batch_size - secondary_batch_size`` primary (labelled) indices then ``secondary_batch_size``
    secondary (unlabelled) ones.

    One pass (one ``iter()``) permutes the primary indices once and yields ``len(primary) // primary_batch_size``
    batches (a leftover that does not fill a batch is dropped). Secondary indices come from an endless chain of
    permutations, restarted at every pass, so with few labelled cases each pass sees only part of the unlabelled set
    (as released).

    Randomness: with ``seed=None`` (default) the permutations come from the global ``np.random`` in the released
    order (primary permutation when the pass starts, each secondary permutation when it is first needed), so
    ``np.random.seed`` reproduces the original sampling. With an int ``seed``, pass ``e`` draws from
    ``np.random.default_rng([seed, e])`` and nothing else: the order of any pass can be rebuilt on resume with
    :meth:`set_epoch`. The pass counter starts at 0 and advances by one at every ``iter()``.

    Args:
        primary_indices: labelled dataset indices, e.g. ``range(labeled_num)``.
        secondary_indices: unlabelled dataset indices, disjoint from ``primary_indices``.
        batch_size: total batch size.
        secondary_batch_size: unlabelled rows per batch (``batch_size - labeled_bs``).
        seed: optional int for per-pass generators (see above).

    Raises:
        ValueError: if either list is empty, the lists overlap, ``secondary_batch_size`` is not in
            ``1 .. len(secondary_indices)``, or ``primary_batch_size = batch_size - secondary_batch_size`` is not in
            ``1 .. len(primary_indices)``.
    """

    def __init__(
        self,
        primary_indices: Sequence[int],
        secondary_indices: Sequence[int],
        batch_size: int,
        secondary_batch_size: int,
        seed: int | None = None,
    ) -> None:
        self.primary_indices = _as_index_list(primary_indices, "primary_indices")
        self.secondary_indices = _as_index_list(secondary_indices, "secondary_indices")
        self.secondary_batch_size = int(secondary_batch_size)
        self.primary_batch_size = int(batch_size) - self.secondary_batch_size
        n_p, n_s = len(self.primary_indices), len(self.secondary_indices)
        if n_p == 0 or n_s == 0:
            raise ValueError(
                f"both index lists must be non-empty, found {n_p} primary (labelled) and {n_s} secondary (unlabelled)"
            )
        if not 0 < self.secondary_batch_size <= n_s:
            raise ValueError(
                f"secondary_batch_size must be in 1..{n_s} (the number of secondary indices), "
                f"found {self.secondary_batch_size}"
            )
        if not 0 < self.primary_batch_size <= n_p:
            raise ValueError(
                f"primary batch size = batch_size - secondary_batch_size = {batch_size} - {self.secondary_batch_size}"
                f" = {self.primary_batch_size} must be in 1..{n_p} (the number of primary indices)"
            )
        overlap = sorted(set(self.primary_indices) & set(self.secondary_indices))
        if overlap:
            raise ValueError(
                f"primary and secondary indices must be disjoint, found {len(overlap)} shared: {overlap[:10]}"
                + (" ..." if len(overlap) > 10 else "")
            )
        if seed is not None:
            seed = operator.index(seed)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` be pass ``epoch`` (only changes the order when ``seed`` is set)."""
        self.epoch = operator.index(epoch)

    def __iter__(self) -> Iterator[List[int]]:
        rng = None if self.seed is None else np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        # drawn now, not at the first next(): the released order of draws from the global np.random
        primary = iterate_once(self.primary_indices, rng)
        secondary = iterate_eternally(self.secondary_indices, rng)
        return (
            list(primary_batch) + list(secondary_batch)
            for primary_batch, secondary_batch in zip(
                grouper(primary, self.primary_batch_size), grouper(secondary, self.secondary_batch_size)
            )
        )

    def __len__(self) -> int:
        return len(self.primary_indices) // self.primary_batch_size
