"""``Conv3d``: ``nn.Conv3d`` that works around a CPU bf16 autocast bug of torch (seen with 2.13 / oneDNN).

Under ``torch.autocast("cpu", dtype=torch.bfloat16)``, the weight gradient of a 3x3x3 convolution whose input has
fewer voxels along an axis than the kernel (the 2x2x2 bottom of a U-Net or V-Net fed 32^3 patches) comes out wrong:
errors of several hundred percent, sometimes inf/NaN, different from call to call (it reads memory it never wrote).
The forward pass and the input gradient are right. Such inputs are tiny, so this class runs exactly those
convolutions in float32 (autocast off), at no measurable cost; every other call is ``nn.Conv3d``'s own. Parameters,
``state_dict`` keys and outputs without autocast are those of ``nn.Conv3d``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Conv3d"]


def _hits_cpu_bf16_bug(x: Tensor, kernel_size: tuple[int, ...]) -> bool:
    """True for a CPU input under low-precision autocast with an axis shorter than the kernel."""
    return (
        x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and any(size < k for size, k in zip(x.shape[2:], kernel_size))
    )


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` with float32 arithmetic where CPU bf16 autocast would give a wrong weight gradient.

    Shapes as ``nn.Conv3d``: (B, C_in, D, H, W) -> (B, C_out, D', H', W'). The float32 path returns float32.
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (nn.Module's own argument name)
        if _hits_cpu_bf16_bug(input, self.kernel_size):
            with torch.autocast("cpu", enabled=False):
                return super().forward(input.float())
        return super().forward(input)
