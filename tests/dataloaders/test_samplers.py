from __future__ import annotations

import itertools

import numpy as np
import pytest

from dataloaders.samplers import TwoStreamBatchSampler


def released_batches(primary, secondary, batch_size, secondary_batch_size):
    """The released sampling written out from its description: global np.random, primary permuted once, secondary an
    endless chain of permutations, batches = primary chunk + secondary chunk."""
    n_primary = batch_size - secondary_batch_size
    primary_perm = list(np.random.permutation(primary))

    def chain():
        while True:
            yield from np.random.permutation(secondary)

    stream = chain()
    out = []
    for b in range(len(primary) // n_primary):
        out.append(
            primary_perm[b * n_primary : (b + 1) * n_primary] + list(itertools.islice(stream, secondary_batch_size))
        )
    return [[int(i) for i in batch] for batch in out]


def test_three_labelled_seven_unlabelled_batch_four_gives_one_batch_of_two_plus_two():
    sampler = TwoStreamBatchSampler(range(3), range(3, 10), batch_size=4, secondary_batch_size=2)
    batches = list(sampler)
    assert len(sampler) == 1 and len(batches) == 1
    (batch,) = batches
    assert len(batch) == 4
    assert set(batch[:2]) <= {0, 1, 2} and len(set(batch[:2])) == 2
    assert set(batch[2:]) <= set(range(3, 10)) and len(set(batch[2:])) == 2


@pytest.mark.parametrize(
    "n_primary, n_secondary, batch_size, secondary_bs",
    [(3, 7, 4, 2), (5, 5, 4, 2), (25, 225, 4, 2), (50, 200, 4, 2), (4, 3, 5, 3), (7, 2, 3, 1), (6, 11, 6, 3)],
)
def test_each_pass_covers_primary_once_and_chains_secondary_permutations(
    n_primary, n_secondary, batch_size, secondary_bs
):
    primary = list(range(1000, 1000 + n_primary))
    secondary = list(range(n_secondary))
    sampler = TwoStreamBatchSampler(primary, secondary, batch_size, secondary_bs, seed=0)
    n_pbs = batch_size - secondary_bs
    for _ in range(3):
        batches = list(sampler)
        assert len(batches) == len(sampler) == n_primary // n_pbs
        assert all(len(b) == batch_size for b in batches)
        labelled = [i for b in batches for i in b[:n_pbs]]
        unlabelled = [i for b in batches for i in b[n_pbs:]]
        assert len(set(labelled)) == len(labelled) and set(labelled) <= set(primary)
        assert set(unlabelled) <= set(secondary)
        # every complete run of len(secondary) draws is a permutation of the secondary indices
        for start in range(0, len(unlabelled) - n_secondary + 1, n_secondary):
            assert sorted(unlabelled[start : start + n_secondary]) == secondary


def test_global_seed_reproduces_the_released_order():
    np.random.seed(1337)
    expected = released_batches(list(range(5)), list(range(5, 20)), 4, 2) + released_batches(
        list(range(5)), list(range(5, 20)), 4, 2
    )
    np.random.seed(1337)
    sampler = TwoStreamBatchSampler(list(range(5)), list(range(5, 20)), 4, 2)
    assert list(sampler) + list(sampler) == expected


def test_seeded_passes_differ_and_set_epoch_replays_a_pass():
    sampler = TwoStreamBatchSampler(range(20), range(20, 60), 4, 2, seed=3)
    passes = [list(sampler) for _ in range(3)]
    assert passes[0] != passes[1] != passes[2]
    resumed = TwoStreamBatchSampler(range(20), range(20, 60), 4, 2, seed=3)
    resumed.set_epoch(2)
    assert list(resumed) == passes[2]


def test_seeded_sampler_ignores_the_global_numpy_state():
    a = TwoStreamBatchSampler(range(10), range(10, 30), 4, 2, seed=9)
    np.random.seed(0)
    first = list(a)
    b = TwoStreamBatchSampler(range(10), range(10, 30), 4, 2, seed=9)
    np.random.seed(1)
    assert list(b) == first


def test_batches_hold_python_ints():
    batch = next(iter(TwoStreamBatchSampler(np.arange(4), np.arange(4, 8), 4, 2)))
    assert all(type(i) is int for i in batch)


@pytest.mark.parametrize(
    "primary, secondary, batch_size, secondary_bs, message",
    [
        ([], [1, 2], 4, 2, "non-empty"),
        ([0, 1], [], 4, 2, "non-empty"),
        ([0, 1], [2, 3], 4, 0, "secondary_batch_size must be in 1..2"),
        ([0, 1], [2, 3], 5, 3, "secondary_batch_size must be in 1..2"),
        ([0, 1], [2, 3], 2, 2, "= 0 must be in 1..2"),
        ([0], [2, 3, 4], 4, 2, "= 2 must be in 1..1"),
        ([0, 1, 2], [2, 3, 1], 4, 2, "disjoint, found 2 shared: \\[1, 2\\]"),
    ],
)
def test_invalid_configurations_raise_value_errors_with_the_numbers(
    primary, secondary, batch_size, secondary_bs, message
):
    with pytest.raises(ValueError, match=message):
        TwoStreamBatchSampler(primary, secondary, batch_size, secondary_bs)


def test_works_as_a_dataloader_batch_sampler():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.arange(12))
    sampler = TwoStreamBatchSampler(range(4), range(4, 12), 4, 2, seed=0)
    batches = [b[0].tolist() for b in DataLoader(data, batch_sampler=sampler)]
    assert len(batches) == 2
    assert all(max(b[:2]) < 4 <= min(b[2:]) for b in batches)
