"""networks/conv.py: the Conv3d that sidesteps torch's CPU bf16 weight-gradient bug on inputs thinner than the kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from networks.conv import Conv3d
from networks.unet_3D import unet_3D_dt
from networks.vnet import VNet_dt


def _weight_grad(conv: nn.Conv3d, x: torch.Tensor, amp: bool) -> torch.Tensor:
    conv.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        y = conv(x)
    y.float().square().sum().backward()
    return conv.weight.grad.clone()


@pytest.mark.parametrize("shape", [(2, 2, 2), (2, 9, 7), (1, 4, 4), (5, 2, 6)])
def test_bf16_weight_gradient_on_thin_inputs_matches_float64(shape):
    torch.manual_seed(0)
    conv = Conv3d(16, 8, 3, padding=1)
    x = torch.randn(2, 16, *shape)
    grads = [_weight_grad(conv, x, amp=True) for _ in range(3)]
    reference = _weight_grad(conv.double(), x.double(), amp=False).float()
    conv.float()
    for g in grads:
        assert torch.isfinite(g).all()
        assert (g - reference).norm() / reference.norm() < 1e-2  # float32 arithmetic on a thin input: no bf16 error
        assert torch.equal(g, grads[0])  # and the same every time


def test_thick_inputs_keep_the_bf16_path_and_agree_to_bf16_precision():
    torch.manual_seed(1)
    conv = Conv3d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 6, 5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    reference = _weight_grad(conv.double(), x.double(), amp=False).float()
    conv.float()
    g = _weight_grad(conv, x, amp=True)
    assert (g - reference).norm() / reference.norm() < 3e-2


def test_without_autocast_it_is_nn_conv3d():
    torch.manual_seed(2)
    ours = Conv3d(4, 6, 3, padding=1)
    plain = nn.Conv3d(4, 6, 3, padding=1)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(1, 4, 2, 3, 5)
    torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "make", [lambda: unet_3D_dt(feature_scale=8), lambda: VNet_dt(n_filters=4, normalization="batchnorm")]
)
def test_networks_on_32_cubed_patches_get_finite_repeatable_bf16_gradients(make):
    torch.manual_seed(3)
    net = make().eval()  # no dropout: both passes do the same arithmetic
    x = torch.randn(2, 1, 32, 32, 32)
    grads = []
    for _ in range(2):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
        sum(o.float().square().mean() for o in out).backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.isfinite(grads[0]).all()
    assert torch.equal(grads[0], grads[1])
