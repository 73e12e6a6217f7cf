"""Monte-Carlo dropout uncertainty: entropy values, randomness, chunking, no autograd."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from utils.uncertainty import entropy_of_mean_softmax, mc_dropout_uncertainty, uncertainty_threshold

LN2 = math.log(2.0)
LN3 = math.log(3.0)


class _DualNet(nn.Module):
    """Tiny dual-output network ``(tanh(z), z)`` with optional dropout."""

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.head(self.drop(torch.relu(self.conv(x))))
        return torch.tanh(z), z


class _Replay(nn.Module):
    """Returns the stored passes in order, as many per call as the input holds (batch B each)."""

    def __init__(self, stack: torch.Tensor) -> None:
        super().__init__()
        self.stack, self.next = stack, 0
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        n = x.shape[0] // self.stack.shape[1]
        out = self.stack[self.next : self.next + n].reshape(-1, *self.stack.shape[2:])
        self.next += n
        return out


def test_entropy_of_two_opposite_passes_is_ln2():
    stack = torch.tensor([[0.0, LN3], [LN3, 0.0]]).reshape(2, 1, 2, 1)  # (1/4, 3/4) and (3/4, 1/4)
    uncertainty, mean_prob = entropy_of_mean_softmax(stack)
    torch.testing.assert_close(mean_prob, torch.full((1, 2, 1), 0.5))
    assert uncertainty.shape == (1, 1, 1)
    assert uncertainty.item() == pytest.approx(-math.log(0.5 + 1e-6), rel=1e-6)


def test_entropy_lies_between_zero_and_ln2_for_two_classes():
    uncertainty, _ = entropy_of_mean_softmax(torch.randn(5, 3, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0)))
    assert uncertainty.shape == (3, 1, 4, 4, 4)
    assert uncertainty.min() >= -1e-5 and uncertainty.max() <= LN2 + 1e-6


def test_entropy_is_about_zero_when_all_passes_agree_on_one_class():
    stack = torch.zeros(4, 2, 2, 3, 3, 3)
    stack[:, :, 1] = 40.0
    uncertainty, _ = entropy_of_mean_softmax(stack)
    assert uncertainty.abs().max() < 1e-5


def test_replayed_passes_give_the_entropy_of_their_mean_for_any_chunk():
    stack = torch.randn(8, 2, 2, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    expected, expected_prob = entropy_of_mean_softmax(stack)
    for chunk in (0, 1, 3, 8, 20):
        uncertainty, mean_prob = mc_dropout_uncertainty(_Replay(stack), torch.zeros(2, 1, 3, 3, 3), chunk=chunk)
        torch.testing.assert_close(uncertainty, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(mean_prob, expected_prob, atol=1e-6, rtol=0)


def test_input_noise_is_clipped_and_fresh_for_every_pass():
    image = torch.randn(2, 1, 3, 3, 3)
    teacher = _Replay(torch.zeros(5, 2, 2, 3, 3, 3))
    mc_dropout_uncertainty(teacher, image, passes=5, noise_std=1.0, noise_clip=0.2, chunk=0)
    noise = (teacher.inputs[0].reshape(5, *image.shape) - image).abs()
    assert noise.max() <= 0.2 + 1e-6
    assert ((noise - 0.2).abs() < 1e-6).float().mean() > 0.5  # std 1 is clipped most of the time
    assert not torch.equal(noise[0], noise[1])


def test_two_calls_differ_because_dropout_and_noise_are_on():
    torch.manual_seed(0)
    net = _DualNet().eval()
    image = torch.randn(2, 1, 4, 4, 4)
    first, _ = mc_dropout_uncertainty(net, image, passes=4)
    second, _ = mc_dropout_uncertainty(net, image, passes=4)
    assert not torch.allclose(first, second)
    assert not net.training  # the previous mode is restored


def test_no_autograd_graph_is_recorded():
    net = _DualNet()
    uncertainty, mean_prob = mc_dropout_uncertainty(net, torch.randn(1, 1, 4, 4, 4, requires_grad=True), passes=2)
    assert not uncertainty.requires_grad and not mean_prob.requires_grad
    assert all(p.grad is None for p in net.parameters())


def test_chunking_does_not_change_the_result_for_a_fixed_seed():
    torch.manual_seed(0)
    net = _DualNet(dropout=0.0)  # dropout masks are drawn by the network, so keep them out of this check
    image = torch.randn(3, 1, 4, 4, 4)
    results = [
        mc_dropout_uncertainty(net, image, passes=8, chunk=chunk, generator=torch.Generator().manual_seed(7))[0]
        for chunk in (0, 1, 3)
    ]
    torch.testing.assert_close(results[1], results[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(results[2], results[0], atol=1e-6, rtol=0)


def test_odd_pass_count_and_any_batch_and_patch_size_work():
    net = _DualNet()
    uncertainty, mean_prob = mc_dropout_uncertainty(net, torch.randn(3, 1, 2, 5, 3), passes=5, chunk=2)
    assert uncertainty.shape == (3, 1, 2, 5, 3) and mean_prob.shape == (3, 2, 2, 5, 3)
    torch.testing.assert_close(mean_prob.sum(1), torch.ones(3, 2, 5, 3))


def test_logits_fn_selects_the_output():
    net = _DualNet(dropout=0.0)
    image = torch.randn(1, 1, 3, 3, 3)
    gen = torch.Generator().manual_seed(3)
    default, _ = mc_dropout_uncertainty(net, image, passes=2, generator=gen)
    gen.manual_seed(3)
    explicit, _ = mc_dropout_uncertainty(net, image, passes=2, generator=gen, logits_fn=lambda out: out[1])
    torch.testing.assert_close(default, explicit)


def test_invalid_options_raise_value_error():
    net, image = _DualNet(), torch.zeros(1, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="passes"):
        mc_dropout_uncertainty(net, image, passes=0)
    with pytest.raises(ValueError, match="chunk"):
        mc_dropout_uncertainty(net, image, chunk=-1)
    with pytest.raises(ValueError, match="logits_stack"):
        entropy_of_mean_softmax(torch.zeros(0, 1, 2, 2))


def test_threshold_ramps_from_three_quarters_to_all_of_ln2():
    assert uncertainty_threshold(0, 30000) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * LN2, rel=1e-12)
    assert uncertainty_threshold(30000, 30000) == pytest.approx(LN2, rel=1e-12)
    assert uncertainty_threshold(10, 0, num_classes=3) == pytest.approx(math.log(3), rel=1e-12)
    with pytest.raises(ValueError, match="num_classes"):
        uncertainty_threshold(0, 10, num_classes=1)
