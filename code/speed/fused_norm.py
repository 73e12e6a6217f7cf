"""InstanceNorm3d(affine=False) + ReLU as one step, and the module swap that puts it into the U-Nets.

:func:`instance_norm_relu` computes ``relu(InstanceNorm3d(x))`` for contiguous or channels-last input and keeps
the input's memory layout (``InstanceNorm3d`` turns channels-last activations back into contiguous ones, and its
backward is slow on them). With a graph it runs a hand-written backward that saves the normalised ``x_hat``.
:func:`fuse_norm_relu` replaces each ``Sequential(Conv3d, InstanceNorm3d, ReLU)`` of a network by a
:class:`FusedConvNormReLU` holding the same modules (same parameters and ``state_dict`` keys). The values agree with
the unfused modules to float rounding (~1e-6), not bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FusedConvNormReLU", "fuse_norm_relu", "fused_x_hat", "instance_norm_relu", "is_fused_norm_output"]


def _is_channels_last(t: Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d)


def _slabs(t: Tensor) -> Tensor:
    """A channels-last (B, C, D, H, W) tensor as its (B*D, H*W, C) memory (a view, no copy)."""
    b, c, d, h, w = t.shape
    return t.permute(0, 2, 3, 4, 1).reshape(b * d, h * w, c)


def _spatial_sum(t: Tensor) -> Tensor:
    """Per-(b, c) sum over D, H, W of a (B, C, D, H, W) tensor, as float64 (B, C); reads ``t`` once.

    Summed in two stages (rows of H*W voxels in float32, then the D row sums in float64), so the error stays
    ~1e-7 relative in either layout; torch's one-stage reduction over the three strided axes of a channels-last
    tensor is both slower and ~100x less precise.
    """
    b, c, d, h, w = t.shape
    if _is_channels_last(t):
        return _slabs(t).sum(1).view(b, d, c).sum(1, dtype=torch.float64)
    return t.reshape(b * c * d, h * w).sum(1).view(b, c, d).sum(2, dtype=torch.float64)


def _spatial_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-(b, c) sum over D, H, W of ``a * b``, as float64 (B, C), without a full-size temporary.

    Contiguous: a batched row-by-row dot product (``vector_norm`` for ``a is b``); channels-last: the diagonal
    of the per-slab C x C Gram matrix ``a^T b`` (one GEMM; cheap next to the 3x3x3 conv that made ``a``).
    """
    n_b, c, d, h, w = a.shape
    if _is_channels_last(a) and _is_channels_last(b):
        gram = torch.bmm(_slabs(a).transpose(1, 2), _slabs(b))
        return gram.diagonal(dim1=1, dim2=2).reshape(n_b, d, c).sum(1, dtype=torch.float64)
    if a is b:
        rows = torch.linalg.vector_norm(a.reshape(n_b * c * d, h * w), dim=1)
        return rows.square().view(n_b, c, d).sum(2, dtype=torch.float64)
    a, b = a.contiguous(), b.contiguous()
    rows = torch.bmm(a.view(n_b * c * d, 1, h * w), b.view(n_b * c * d, h * w, 1))
    return rows.view(n_b, c, d).sum(2, dtype=torch.float64)


def _per_channel(stat: Tensor, like: Tensor) -> Tensor:
    """(B, C) float64 -> (B, C, 1, 1, 1) in ``like``'s dtype, to broadcast over D, H, W."""
    return stat.to(like.dtype).view(*stat.shape, 1, 1, 1)


def _normalise(x: Tensor, eps: float, inplace: bool) -> tuple[Tensor, Tensor]:
    """``((x - mean) * rstd, rstd)`` per (b, c), rstd = 1 / sqrt(var + eps), (B, C, 1, 1, 1).

    Two passes, centred before squaring, like ``InstanceNorm3d`` (biased variance). Writes into ``x`` if
    ``inplace``, else into one new tensor of ``x``'s layout.
    """
    n = x[0, 0].numel()
    mean = _per_channel(_spatial_sum(x) / n, x)
    y = x.sub_(mean) if inplace else x - mean
    rstd = _per_channel(torch.rsqrt(_spatial_dot(y, y) / n + eps), y)
    return y.mul_(rstd), rstd


class _InstanceNormReLU(torch.autograd.Function):
    """relu((x - mean) * rstd) with a hand-written backward; saves the normalised x_hat and rstd.

    Backward, with g_y = g * 1[x_hat > 0] and means over the D*H*W voxels of each (b, c):
        dL/dx = rstd * (g_y - mean(g_y) - x_hat * mean(g_y * x_hat))
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, eps: float) -> Tensor:
        x_hat, rstd = _normalise(x, eps, inplace=False)
        ctx.save_for_backward(x_hat, rstd)
        return torch.relu(x_hat)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        x_hat, rstd = ctx.saved_tensors
        n = x_hat[0, 0].numel()
        grad_y = torch.ops.aten.threshold_backward(grad, x_hat, 0)  # grad where x_hat > 0, else 0
        mean_g = _per_channel(_spatial_sum(grad_y) / n, grad_y)
        mean_gx = _per_channel(_spatial_dot(grad_y, x_hat) / n, grad_y)
        return grad_y.addcmul_(x_hat, mean_gx, value=-1.0).sub_(mean_g).mul_(rstd), None


def instance_norm_relu(x: Tensor, eps: float = 1e-5, inplace: bool = False) -> Tensor:
    """``relu(InstanceNorm3d(affine=False, eps)(x))`` in one step, for contiguous or channels-last input.

    .. math:: y = \\max\\big(0, (x - \\mu_{bc}) / \\sqrt{\\sigma^2_{bc} + \\epsilon}\\big)

    with the mean and biased variance over the D, H, W voxels of each sample b and channel c. The output keeps
    the input's memory layout (``InstanceNorm3d`` makes channels-last input contiguous). Values agree with the
    unfused modules to ~1e-6. When autograd needs a graph, a hand-written backward is used; without one (teacher
    passes, inference) the work is done in ``x``'s memory if ``inplace``. Half-precision input (e.g. under
    ``torch.autocast``) is normalised in float32 and returned in its own dtype, like the native kernels do.

    Args:
        x: (B, C, D, H, W) floating tensor, at least two voxels per channel.
        eps: added to the variance (1e-5, ``InstanceNorm3d``'s default).
        inplace: overwrite ``x`` when no gradient is needed. Default False.

    Returns:
        (B, C, D, H, W) tensor, same layout as ``x``.

    Raises:
        ValueError: if ``x`` is not 5-D or holds a single voxel per channel.
    """
    if x.dim() != 5 or x.shape[2:].numel() < 2:
        raise ValueError(f"instance_norm_relu expects (B, C, D, H, W) with more than one voxel, got {tuple(x.shape)}")
    if x.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(x.device.type):
        # statistics in float32, as the native kernels accumulate; the GEMMs inside must not drop to bf16 either
        with torch.autocast(x.device.type, enabled=False):
            return instance_norm_relu(x.float(), eps, inplace).to(x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return _InstanceNormReLU.apply(x, eps)
    return _normalise(x, eps, inplace)[0].relu_()



def is_fused_norm_output(t: Tensor) -> bool:
    """True if ``t`` came out of :func:`instance_norm_relu` with a graph (its ``x_hat`` is then saved already)."""
    return isinstance(t.grad_fn, _InstanceNormReLU._backward_cls)  # type: ignore[attr-defined]


def fused_x_hat(t: Tensor) -> Tensor:
    """The normalised input ``x_hat`` saved by the fused step that produced ``t`` (``t == relu(x_hat)``)."""
    return t.grad_fn.saved_tensors[0]  # type: ignore[union-attr]


class FusedConvNormReLU(nn.Sequential):
    """``Sequential(Conv3d, InstanceNorm3d, ReLU)`` (keys ``0.weight``, ``0.bias``) whose norm and ReLU run as one
    :func:`instance_norm_relu` step.

    Shapes: (B, C_in, D, H, W) -> (B, C_out, D, H, W), in the layout of the convolution's output.
    """

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return instance_norm_relu(self[0](x), self[1].eps, inplace=True)


def _is_conv_norm_relu(module: nn.Module) -> bool:
    return (
        type(module) is nn.Sequential
        and len(module) == 3
        and isinstance(module[0], nn.Conv3d)
        and type(module[1]) is nn.InstanceNorm3d
        and not module[1].affine
        and not module[1].track_running_stats
        and isinstance(module[2], nn.ReLU)
    )


def fuse_norm_relu(net: nn.Module) -> int:
    """Swap every ``Sequential(Conv3d, InstanceNorm3d(affine=False), ReLU)`` inside ``net`` for a
    :class:`FusedConvNormReLU` with the same three modules, in place; return how many were swapped.

    Parameters and ``state_dict`` keys do not change; networks without such blocks (the V-Nets with their default
    BatchNorm) are left as they are.
    """
    swapped = 0
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if _is_conv_norm_relu(child):
                setattr(parent, name, FusedConvNormReLU(*child))
                swapped += 1
    return swapped
