"""``speed.bernoulli.bernoulli_mask`` against torch's own ``bernoulli_``: same masks, same generator state afterwards."""

from __future__ import annotations

import pytest
import torch

from speed import bernoulli
from speed.bernoulli import bernoulli_mask, uniform_matches_bernoulli


def _reference(shape, keep_prob, dtype=torch.float32, generator=None):
    return torch.empty(shape, dtype=dtype).bernoulli_(keep_prob, generator=generator) != 0


@pytest.mark.parametrize(
    "shape",
    [(0,), (1,), (7, 3), (2, 16, 9, 10, 11), (bernoulli._CHUNK * 2 + 5,)],  # empty, odd, several chunks
)
@pytest.mark.parametrize("keep_prob", [0.0, 0.7, 0.5, 1.0])
def test_same_mask_and_generator_state_as_bernoulli(shape, keep_prob):
    torch.manual_seed(11)
    expected = _reference(shape, keep_prob)
    after_expected = torch.rand(5)
    torch.manual_seed(11)
    mask = bernoulli_mask(shape, keep_prob)
    after = torch.rand(5)
    assert mask.dtype == torch.bool and tuple(mask.shape) == tuple(shape)
    assert torch.equal(mask, expected)
    assert torch.equal(after, after_expected)  # the global stream moved on exactly as bernoulli_ moves it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_and_explicit_generator(dtype):
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    expected = _reference((4, 2, 8, 8, 8), 0.7, dtype, g1)
    mask = bernoulli_mask((4, 2, 8, 8, 8), 0.7, dtype=dtype, generator=g2)
    assert torch.equal(mask, expected)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_keep_rate_is_the_probability():
    torch.manual_seed(0)
    n = 400_000
    rate = bernoulli_mask((n,), 0.7).float().mean().item()
    assert abs(rate - 0.7) < 5 * (0.7 * 0.3 / n) ** 0.5


def test_falls_back_to_bernoulli_where_the_check_fails(monkeypatch):
    calls = []
    monkeypatch.setattr(bernoulli, "uniform_matches_bernoulli", lambda dtype: False)
    monkeypatch.setattr(bernoulli, "_uniform_compare", lambda *a: calls.append(a))
    torch.manual_seed(4)
    expected = _reference((3, 50), 0.6)
    torch.manual_seed(4)
    assert torch.equal(bernoulli_mask((3, 50), 0.6), expected)
    assert calls == []


def test_check_is_true_on_a_plain_torch_kernel_cpu():
    """The fast path is in use where torch runs its serial kernel (not on Intel CPUs with MKL, where it is skipped)."""
    try:
        with open("/proc/cpuinfo") as f:
            intel = "GenuineIntel" in f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to tell the CPU vendor")
    if intel and torch.backends.mkl.is_available():
        pytest.skip("torch's bernoulli_ runs MKL's own generator on Intel CPUs; the fast path is rightly off there")
    assert uniform_matches_bernoulli(torch.float32)


@pytest.mark.parametrize("keep_prob", [-0.1, 1.5, float("nan")])
def test_bad_probability(keep_prob):
    with pytest.raises(ValueError, match="keep_prob"):
        bernoulli_mask((3,), keep_prob)
