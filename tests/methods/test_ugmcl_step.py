"""One whole UG-MCL training step against a loss assembled by hand from torch primitives (SPEC section 3).

Dropout and input noise are switched off so the teacher's T passes are deterministic; the student's weights are
perturbed after the teacher was copied from it, so the consistency terms are not trivially zero.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.config import TrainConfig
from methods.base import Batch
from methods.ugmcl import UGMCL
from networks.net_factory_3d import net_factory_3d


def _dice_loss(score: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target = target.float()
    return 1 - (2 * (score * target).sum() + 1e-5) / ((score * score).sum() + (target * target).sum() + 1e-5)


@pytest.mark.parametrize("step", [0, 4000, 29999])
def test_training_step_loss_equals_the_hand_assembled_equation(step: int) -> None:
    torch.manual_seed(0)
    net = net_factory_3d("unet_3D_dt", in_chns=1, class_num=2, feature_scale=16)
    for module in net.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
    cfg = TrainConfig(noise_std=0.0, mc_passes=3, max_iterations=30000)
    method = UGMCL(net, cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    image = torch.randn(4, 1, 32, 32, 32)
    label = (torch.rand(4, 32, 32, 32) > 0.8).long()

    loss, logs = method.training_step(Batch(image, label, labeled_bs=2), step)

    with torch.no_grad():
        d, z = net(image)
        _, z_t = method.teacher(image)
    p, q = torch.softmax(z, 1), torch.softmax(z_t, 1)
    u = -(q * torch.log(q + 1e-6)).sum(1, keepdim=True)  # all T passes agree: entropy of one pass
    ramp = lambda t, length: math.exp(-5 * (1 - min(max(t, 0), length) / length) ** 2)  # noqa: E731
    tau = (0.75 + 0.25 * ramp(step, 30000)) * math.log(2)
    w = 0.1 * ramp(step // 150, 200)
    m = (u < tau).float()
    y = label[:2]
    supervised = 0.5 * (F.cross_entropy(z[:2], y) + _dice_loss(p[:2, 1], y == 1)
                        + _dice_loss(torch.sigmoid(-1500 * d[:2, 1]), y == 1))
    intra = 0.5 * (m * (p - q) ** 2).sum() / (2 * m.sum() + 1e-16)
    cross = ((torch.sigmoid(-1500 * d) - p) ** 2).mean()
    expected = supervised + w * intra + w * cross

    assert torch.allclose(loss.detach(), expected, rtol=1e-5, atol=1e-7)
    assert logs["consistency_weight"] == pytest.approx(w)
    assert logs["threshold"] == pytest.approx(tau)
    assert w * intra > 0 or step == 0  # the consistency term is really exercised
