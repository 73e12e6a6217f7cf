"""3D U-Net family of UG-MCL / SSL4MIS: ``unet_3D``, the dual-output ``unet_3D_dt`` and the URPC ``unet_3D_ds``.

All three share one trunk with the published submodule names (``conv1`` .. ``conv4``, ``center``,
``up_concat4`` .. ``up_concat1``), so the released UG-MCL checkpoint (a plain ``state_dict`` of 38 tensors)
loads into :class:`unet_3D_dt` with ``strict=True``.

Trunk (filters ``[64, 128, 256, 512, 1024] / feature_scale``, i.e. ``[16, 32, 64, 128, 256]`` by default):

* block = 2 x (Conv3d k3 p1 with bias -> InstanceNorm3d(affine=False) -> ReLU); the norm is left out when
  ``is_batchnorm=False`` (the original's name: it has always meant InstanceNorm, never BatchNorm);
* encoder ``conv1`` .. ``conv4``, each followed by MaxPool3d(2); bottleneck ``center``;
* decoder ``up_concat4`` .. ``up_concat1``: trilinear x2 upsampling of the deeper map, ``cat([skip, up])``,
  then a block.

Speed (opt-in, both off by default so that outputs are bit for bit the released code's):
:func:`set_fused_norm` (or ``fused_norm=True``) runs the norm and the ReLU after each conv as one step
(:func:`instance_norm_relu`, same values as ``relu(InstanceNorm3d(x))`` to ~1e-6), and :func:`to_channels_last`
stores the conv weights in ``torch.channels_last_3d``, which makes every conv, pooling and upsampling run in that
layout (about 2x faster 3-D convs on CPU; use both together, ``InstanceNorm3d`` itself does not keep the layout).
Either way the outputs come back in the default (contiguous) layout and dropout draws its mask in the logical
(B, C, D, H, W) order, so a seeded run gives the same masks and, up to float rounding, the same outputs.

Note:
    Every spatial side of the input must be a multiple of 16 (four poolings by 2); ``forward`` raises a
    ``ValueError`` otherwise. With the norm on (``is_batchnorm=True``) the 1/16 bottleneck must hold more than
    one voxel, so ``(16, 16, 16)`` is refused too. ``(96, 96, 96)`` training patches, ``(32, 48, 32)`` and
    ``(16, 16, 32)`` work.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from networks.conv import Conv3d
from networks.dropout_masks import bernoulli_mask
from networks.input_checks import SIDE_MULTIPLE, check_volume

__all__ = [
    "unet_3D",
    "unet_3D_dt",
    "unet_3D_ds",
    "unet_3D_dv_semi",
    "UnetConv3",
    "UnetUp3_CT",
    "UnetDsv3",
    "instance_norm_relu",
    "set_fused_norm",
    "to_channels_last",
]

_BASE_FILTERS = (64, 128, 256, 512, 1024)


def _kaiming_init_convs(module: nn.Module) -> None:
    """Kaiming-normal (fan_in, gain sqrt(2)) weights for every Conv3d inside ``module``; biases keep torch's init."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")


def _filters(feature_scale: int) -> list[int]:
    if feature_scale <= 0 or _BASE_FILTERS[0] // feature_scale < 1:
        raise ValueError(f"feature_scale must be a positive number <= 64, got {feature_scale!r}")
    return [int(f / feature_scale) for f in _BASE_FILTERS]


# ----------------------------------------------------------------------------------------------
# fast path: fused InstanceNorm3d(affine=False) + ReLU, channels_last_3d, logical-order dropout
# ----------------------------------------------------------------------------------------------
def to_channels_last(net: nn.Module) -> nn.Module:
    """Store ``net``'s 5-D weights in ``torch.channels_last_3d`` (in place, like ``nn.Module.to``) and return it.

    Convolutions follow their weight's layout, so every activation of a U-Net from this file is then
    channels-last: on CPU (oneDNN) the 3x3x3 convs, max-pooling and trilinear upsampling run about 2x faster.
    The U-Nets still take inputs in either layout and return contiguous outputs; ``state_dict`` keys, shapes and
    values do not change (``torch.save`` keeps the strides, ``load_state_dict`` copies into any layout).
    """
    return net.to(memory_format=torch.channels_last_3d)


def set_fused_norm(net: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every conv block of the U-Nets in ``net`` to (or back from) the fused norm + ReLU step; return ``net``.

    With ``enabled``, each Conv3d -> InstanceNorm3d -> ReLU runs as Conv3d -> :func:`instance_norm_relu`: the
    same values to ~1e-6 (float rounding differs: tests that compare bit for bit with the released code need it
    off), about 1.5-2x faster for that step, and the layout is kept (``InstanceNorm3d`` turns channels-last
    activations back into contiguous ones, and its backward is ~10x slower on them). Modules, parameters and
    ``state_dict`` keys do not change. Blocks without a norm (``is_batchnorm=False``) and other networks are left
    as they are.
    """
    for module in net.modules():
        if isinstance(module, _ConvNormReLU):
            module.fused = enabled
    return net


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


class _ReluOf:
    """A saved activation kept as the input of its ReLU, recomputed when the backward needs it."""

    __slots__ = ("x_hat",)

    def __init__(self, x_hat: Tensor) -> None:
        self.x_hat = x_hat

    def recompute(self) -> Tensor:
        return torch.relu(self.x_hat)


class _Dropped:
    """A saved dropout output kept as its source and boolean mask, recomputed when the backward needs it."""

    __slots__ = ("source", "mask", "p")

    def __init__(self, x: Tensor, mask: Tensor, p: float) -> None:
        self.source, self.mask, self.p = _as_source(x), mask, p

    def recompute(self) -> Tensor:
        x = _unpack_saved(self.source)
        return x * self.mask.to(x.dtype).div_(1.0 - self.p)


class _UpsampleCat:
    """A saved ``cat([skip, up(deeper)])`` kept as its two sources, recomputed when the backward needs it."""

    __slots__ = ("up", "skip", "deeper")

    def __init__(self, up: nn.Module, skip: Tensor, deeper: Tensor) -> None:
        self.up, self.skip, self.deeper = up, _as_source(skip), _as_source(deeper)

    def recompute(self) -> Tensor:
        return torch.cat([_unpack_saved(self.skip), self.up(_unpack_saved(self.deeper))], dim=1)


def _as_source(t: Tensor) -> Any:
    """What to keep of ``t`` for a recomputation: its norm's x_hat if it is a fused norm + ReLU output, else ``t``."""
    if isinstance(t.grad_fn, _InstanceNormReLU._backward_cls):  # type: ignore[attr-defined]
        return _ReluOf(t.grad_fn.saved_tensors[0])
    return t


def _pack_saved(t: Tensor) -> Any:
    """Saved-tensor pack hook of the fused networks: keep activations that can be recomputed cheaply as their sources.

    * the output of a fused norm + ReLU (saved by the next conv or a max-pool) as the norm's x_hat, which the
      fused step saves anyway: one full-size activation less per conv layer;
    * a decoder's ``cat([skip, up(deeper)])`` (saved by its first conv) as the x_hat of skip and deeper:
      recomputing it costs one upsampling and one copy in the backward;
    * a dropout output (saved by ``final``) as its source's x_hat and the boolean mask.

    Recomputations are bit for bit the saved values (same deterministic ops on the same inputs).
    """
    recompute = getattr(t, "_unet_recompute", None)
    if recompute is not None:
        return recompute
    return _as_source(t)


def _unpack_saved(packed: Any) -> Tensor:
    return packed.recompute() if isinstance(packed, (_ReluOf, _UpsampleCat, _Dropped)) else packed


def _keep_relu_outputs_as_inputs(net: nn.Module) -> Any:
    """``saved_tensors_hooks`` (:func:`_pack_saved`) while a graph is recorded through fused blocks, else a no-op.

    The hooks apply to everything saved inside the forward: a caller's own ``saved_tensors_hooks`` (e.g.
    ``torch.autograd.graph.save_on_cpu``) do not reach the tensors saved inside a network with fused blocks.
    """
    if torch.is_grad_enabled() and any(isinstance(m, _ConvNormReLU) and m.fused for m in net.modules()):
        return torch.autograd.graph.saved_tensors_hooks(_pack_saved, _unpack_saved)
    return contextlib.nullcontext()


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


def _dropout_mask(module: nn.Module, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The elements ``F.dropout`` keeps on CPU, as booleans in the logical order: its noise is
    ``empty -> bernoulli_(1 - p) -> div_(1 - p)``, and :func:`bernoulli_mask` draws that ``bernoulli_`` faster."""
    return bernoulli_mask(shape, 1.0 - module.p, dtype, device)


class _MaskedDropout(torch.autograd.Function):
    """``x * (mask / (1 - p))`` (the values ``F.dropout`` computes) saving the boolean mask, not a float noise."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, mask: Tensor, p: float) -> Tensor:
        ctx.save_for_backward(mask)
        ctx.p = p
        return x * mask.to(x.dtype).div_(1.0 - p)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype).div_(1.0 - ctx.p), None, None


def _dropout(module: nn.Module, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """``module(x)`` for an ``nn.Dropout``, drawing the mask in the logical (B, C, D, H, W) order.

    ``F.dropout`` fills its noise tensor in memory order, so a channels-last activation would get other masks
    than the contiguous one for the same seed. For a non-contiguous ``x`` this draws the noise contiguously,
    with torch's CPU steps (:func:`_dropout_mask`), and multiplies; contiguous input takes ``F.dropout`` itself,
    as released. A boolean ``mask`` drawn beforehand (:meth:`unet_3D.draw_dropout_masks`) is used instead of
    drawing. Values are ``F.dropout``'s either way; with a graph, the own paths save a boolean mask and let the
    next layer keep the output as a recomputation (:func:`_pack_saved`).
    """
    p = module.p
    if not module.training or p == 0.0 or (mask is None and (x.is_contiguous() or p == 1.0)):
        return F.dropout(x, p, module.training, module.inplace)
    recording = torch.is_grad_enabled() and x.requires_grad
    if mask is None:
        mask = _dropout_mask(module, x.shape, x.dtype, x.device)
    if tuple(mask.shape) != tuple(x.shape):
        raise ValueError(f"pre-drawn dropout mask {tuple(mask.shape)} does not fit activation {tuple(x.shape)}")
    if not recording or torch.compiler.is_compiling():  # compiled: the graph plans what its backward keeps
        return x * mask.to(x.dtype).div_(1.0 - p)
    out = _MaskedDropout.apply(x, mask, p)
    out._unet_recompute = _Dropped(x, mask, p)  # type: ignore[attr-defined]
    return out


class _ConvNormReLU(nn.Sequential):
    """``Sequential(Conv3d, InstanceNorm3d, ReLU)`` (keys ``0.weight``, ``0.bias``) that runs the norm and the
    ReLU as one :func:`instance_norm_relu` step when ``fused``; without a norm it is a plain Sequential."""

    def __init__(self, *layers: nn.Module, fused: bool = False) -> None:
        super().__init__(*layers)
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        norm = self[1] if len(self) == 3 else None
        if not (self.fused and isinstance(norm, nn.InstanceNorm3d)):
            return super().forward(x)
        return instance_norm_relu(self[0](x), norm.eps, inplace=True)


class UnetConv3(nn.Module):
    """Two (Conv3d k3 p1 -> InstanceNorm3d(affine=False) -> ReLU) layers, keys ``conv1.0.*`` and ``conv2.0.*``.

    Args:
        in_size: input channels.
        out_size: output channels.
        is_batchnorm: add the InstanceNorm3d (the original's name for it). Default True.
        fused_norm: run each norm and its ReLU as one :func:`instance_norm_relu` step (same values to ~1e-6,
            faster, keeps the channels-last layout). Default False (the released modules, bit for bit).

    Shapes: (B, in_size, D, H, W) -> (B, out_size, D, H, W).
    """

    def __init__(self, in_size: int, out_size: int, is_batchnorm: bool = True, fused_norm: bool = False) -> None:
        super().__init__()
        self.conv1 = self._layer(in_size, out_size, is_batchnorm, fused_norm)
        self.conv2 = self._layer(out_size, out_size, is_batchnorm, fused_norm)
        # The original initialises here and again model-wide. Repeating both keeps the random stream, so
        # a given seed gives the same starting weights as the released code.
        _kaiming_init_convs(self)

    @staticmethod
    def _layer(in_size: int, out_size: int, is_batchnorm: bool, fused_norm: bool = False) -> nn.Sequential:
        layers: list[nn.Module] = [Conv3d(in_size, out_size, kernel_size=3, stride=1, padding=1)]
        if is_batchnorm:
            layers.append(nn.InstanceNorm3d(out_size))
        layers.append(nn.ReLU(inplace=True))
        return _ConvNormReLU(*layers, fused=fused_norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class UnetUp3_CT(nn.Module):
    """Decoder step: trilinear x2 upsampling of the deeper map, ``cat([skip, up], 1)``, then a :class:`UnetConv3`.

    Args:
        in_size: channels of the deeper map.
        out_size: channels of the skip map and of the output.
        is_batchnorm: passed to the block.
        fused_norm: passed to the block. Default False.

    Shapes: skip (B, out_size, 2D, 2H, 2W), deeper (B, in_size, D, H, W) -> (B, out_size, 2D, 2H, 2W).
    """

    def __init__(self, in_size: int, out_size: int, is_batchnorm: bool = True, fused_norm: bool = False) -> None:
        super().__init__()
        self.conv = UnetConv3(in_size + out_size, out_size, is_batchnorm, fused_norm)
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)

    def forward(self, skip: Tensor, deeper: Tensor) -> Tensor:
        merged = torch.cat([skip, self.up(deeper)], dim=1)
        if self.conv.conv1.fused and merged.requires_grad:
            # read by _pack_saved when the conv saves its input: recompute the concatenation instead of keeping it
            merged._unet_recompute = _UpsampleCat(self.up, skip, deeper)  # type: ignore[attr-defined]
        return self.conv(merged)


class UnetDsv3(nn.Module):
    """Deep-supervision head: Conv3d k1 to ``out_size`` channels, then trilinear upsampling by ``scale_factor``.

    Shapes: (B, in_size, D, H, W) -> (B, out_size, s*D, s*H, s*W).
    """

    def __init__(self, in_size: int, out_size: int, scale_factor: int) -> None:
        super().__init__()
        self.dsv = nn.Sequential(
            nn.Conv3d(in_size, out_size, kernel_size=1),
            nn.Upsample(scale_factor=scale_factor, mode="trilinear", align_corners=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.dsv(x)


class _UNet3DTrunk(nn.Module):
    """Encoder, bottleneck and decoder blocks shared by the models below (registered in the original order)."""

    def __init__(self, feature_scale: int, in_channels: int, is_batchnorm: bool, fused_norm: bool = False) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.feature_scale = feature_scale
        self.is_batchnorm = is_batchnorm
        f = _filters(feature_scale)
        self.filters = f
        self.conv1 = UnetConv3(in_channels, f[0], is_batchnorm, fused_norm)
        self.maxpool1 = nn.MaxPool3d(kernel_size=2)
        self.conv2 = UnetConv3(f[0], f[1], is_batchnorm, fused_norm)
        self.maxpool2 = nn.MaxPool3d(kernel_size=2)
        self.conv3 = UnetConv3(f[1], f[2], is_batchnorm, fused_norm)
        self.maxpool3 = nn.MaxPool3d(kernel_size=2)
        self.conv4 = UnetConv3(f[2], f[3], is_batchnorm, fused_norm)
        self.maxpool4 = nn.MaxPool3d(kernel_size=2)
        self.center = UnetConv3(f[3], f[4], is_batchnorm, fused_norm)
        self.up_concat4 = UnetUp3_CT(f[4], f[3], is_batchnorm, fused_norm)
        self.up_concat3 = UnetUp3_CT(f[3], f[2], is_batchnorm, fused_norm)
        self.up_concat2 = UnetUp3_CT(f[2], f[1], is_batchnorm, fused_norm)
        self.up_concat1 = UnetUp3_CT(f[1], f[0], is_batchnorm, fused_norm)

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Return the four skip maps (full, 1/2, 1/4, 1/8 resolution) and the bottleneck (1/16)."""
        check_volume(x, self.in_channels, type(self).__name__, self.is_batchnorm)
        conv1 = self.conv1(x)
        conv2 = self.conv2(self.maxpool1(conv1))
        conv3 = self.conv3(self.maxpool2(conv2))
        conv4 = self.conv4(self.maxpool3(conv3))
        center = self.center(self.maxpool4(conv4))
        return conv1, conv2, conv3, conv4, center


class unet_3D(_UNet3DTrunk):  # noqa: N801 - the published name
    """3D U-Net of SSL4MIS / UG-MCL with one segmentation output.

    Dropout(p=0.3) is applied to the bottleneck output and to the ``up_concat1`` output (active in train mode
    only); ``final`` is a Conv3d k1 from ``filters[0]`` to ``n_classes``. Conv weights are Kaiming-normal (fan_in).

    Args:
        feature_scale: divides the filters ``[64, 128, 256, 512, 1024]``. Default 4 (-> 16 .. 256); 8 gives a
            cheap model for CPU studies.
        n_classes: output channels. Default 2.
        is_deconv: accepted for compatibility with the original signature and ignored: the original always
            upsamples trilinearly. Default True.
        in_channels: input channels. Default 1.
        is_batchnorm: use InstanceNorm3d(affine=False) after each conv (the original's name). Default True.
        fused_norm: run each norm and the ReLU after it as one :func:`instance_norm_relu` step (same values to
            ~1e-6, faster, no extra parameters or keys; see :func:`set_fused_norm`). Default False: the
            ``InstanceNorm3d`` and ``ReLU`` modules run one after the other, bit for bit as released.

    Shapes:
        input (B, in_channels, D, H, W) with D, H, W multiples of 16 -> logits (B, n_classes, D, H, W).

    Raises:
        ValueError: for ``feature_scale`` outside (0, 64] at construction, or in ``forward`` for an input with
            the wrong rank or channel count, a spatial side that is not a multiple of 16, or (with the norm on)
            a size of only (16, 16, 16).
    """

    def __init__(
        self,
        feature_scale: int = 4,
        n_classes: int = 2,
        is_deconv: bool = True,
        in_channels: int = 1,
        is_batchnorm: bool = True,
        fused_norm: bool = False,
    ) -> None:
        super().__init__(feature_scale, in_channels, is_batchnorm, fused_norm)
        self.n_classes = n_classes
        self.is_deconv = is_deconv
        self.final = nn.Conv3d(self.filters[0], n_classes, kernel_size=1)
        self.dropout1 = nn.Dropout(p=0.3)
        self.dropout2 = nn.Dropout(p=0.3)
        self._drawn_masks: tuple[tuple[int, ...], Tensor, Tensor, int] | None = None
        _kaiming_init_convs(self)

    def draw_dropout_masks(
        self, input_shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> None:
        """Draw now the two dropout masks that a train-mode forward of an input of this shape would draw.

        The masks come from torch's global RNG with exactly the calls and order of that forward (bottleneck
        first, then the ``up_concat1`` output) and are kept as booleans; the next train-mode forwards use them
        instead of drawing, row by row: one forward of ``input_shape``, or several of fewer rows that together
        make up its batch, in order. So the RNG stream moves on as if the forward had run: other random work (the
        teacher passes of UG-MCL) can run in between and gets the same random numbers, and the forward(s) the
        same masks, as in the original order; and a batch can be run in smaller pieces (less memory) with the
        masks of one forward of the whole batch. Nothing is drawn in eval mode.

        Args:
            input_shape: (N, in_channels, D, H, W): the rows the coming forward(s) will take in total.
            dtype: dtype of the activations (the noise is drawn in it, as ``F.dropout`` does). Default float32.
            device: where to draw. Default: the device of the first parameter.

        Raises:
            ValueError: if ``input_shape`` is not an input this network accepts.
        """
        shape = tuple(int(s) for s in input_shape)
        check_volume(torch.empty(shape, device="meta"), self.in_channels, type(self).__name__, self.is_batchnorm)
        self._drawn_masks = None
        if not self.training:
            return
        if device is None:
            device = next(self.parameters()).device
        rows, spatial = shape[0], shape[2:]
        center = (rows, self.filters[4], *(s // SIDE_MULTIPLE for s in spatial))
        full = (rows, self.filters[0], *spatial)
        first = _dropout_mask(self.dropout1, center, dtype, torch.device(device))
        second = _dropout_mask(self.dropout2, full, dtype, torch.device(device))
        self._drawn_masks = (shape, first, second, 0)

    def _take_drawn_masks(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The pre-drawn masks for the rows of ``x`` (consumed), or ``(None, None)`` to draw as usual."""
        drawn, self._drawn_masks = self._drawn_masks, None
        if drawn is None or not self.training:
            return None, None
        shape, first, second, used = drawn
        rows = x.shape[0]
        if tuple(x.shape[1:]) != shape[1:] or used + rows > shape[0]:
            raise ValueError(
                f"dropout masks were drawn for an input {shape} ({used} rows used), but the input is {tuple(x.shape)}"
            )
        if used + rows < shape[0]:
            self._drawn_masks = (shape, first, second, used + rows)
        return first[used : used + rows], second[used : used + rows]

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, D, H, W) -> logits (B, n_classes, D, H, W)."""
        masks = self._take_drawn_masks(x)
        with _keep_relu_outputs_as_inputs(self):
            conv1, conv2, conv3, conv4, center = self._encode(x)
            center = _dropout(self.dropout1, center, masks[0])
            up4 = self.up_concat4(conv4, center)
            up3 = self.up_concat3(conv3, up4)
            up2 = self.up_concat2(conv2, up3)
            up1 = _dropout(self.dropout2, self.up_concat1(conv1, up2), masks[1])
            return self.final(up1).contiguous()  # channels-last nets too return the default layout


class unet_3D_dt(unet_3D):  # noqa: N801 - the published name
    """UG-MCL's dual-output 3D U-Net: the :class:`unet_3D` trunk and head, returning ``(tanh(z), z)``.

    The "distance" output is ``tanh`` of the *same* logits ``z`` (no separate regression head; that is the
    released code, the paper's separate head is :class:`networks.vnet.VNet_dt`). Same arguments, parameters
    (5,884,050 with the defaults) and ``state_dict`` keys as :class:`unet_3D`.

    Shapes:
        input (B, in_channels, D, H, W), sides multiples of 16 -> ``(dis, logits)``, each (B, n_classes, D, H, W),
        with ``dis = tanh(logits)`` in (-1, 1).

    Raises:
        ValueError: as :class:`unet_3D`.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """(B, in_channels, D, H, W) -> (tanh(logits), logits), each (B, n_classes, D, H, W)."""
        logits = super().forward(x)
        return torch.tanh(logits), logits


class unet_3D_ds(_UNet3DTrunk):  # noqa: N801 - named like its siblings
    """3D U-Net with deep supervision for URPC (SSL4MIS's ``unet_3D_dv_semi``).

    No dropout on the bottleneck; instead Dropout3d with p = 0.5, 0.3, 0.2, 0.1 on the outputs of
    ``up_concat4`` .. ``up_concat1`` (the feature-level perturbations of URPC, active in train mode only).
    Heads: ``dsv4``, ``dsv3``, ``dsv2`` = Conv3d k1 on the 1/8, 1/4, 1/2 resolution decoder maps followed by
    trilinear upsampling x8, x4, x2; ``dsv1`` = Conv3d k1 on the full-resolution map.

    Args:
        feature_scale, n_classes, is_deconv, in_channels, is_batchnorm, fused_norm: as :class:`unet_3D`.

    Shapes:
        input (B, in_channels, D, H, W), sides multiples of 16 -> tuple ``(dsv1, dsv2, dsv3, dsv4)`` of logits,
        each (B, n_classes, D, H, W), finest decoder level first.

    Raises:
        ValueError: as :class:`unet_3D`.
    """

    def __init__(
        self,
        feature_scale: int = 4,
        n_classes: int = 2,
        is_deconv: bool = True,
        in_channels: int = 1,
        is_batchnorm: bool = True,
        fused_norm: bool = False,
    ) -> None:
        super().__init__(feature_scale, in_channels, is_batchnorm, fused_norm)
        self.n_classes = n_classes
        self.is_deconv = is_deconv
        f = self.filters
        self.dsv4 = UnetDsv3(f[3], n_classes, scale_factor=8)
        self.dsv3 = UnetDsv3(f[2], n_classes, scale_factor=4)
        self.dsv2 = UnetDsv3(f[1], n_classes, scale_factor=2)
        self.dsv1 = nn.Conv3d(f[0], n_classes, kernel_size=1)
        self.dropout1 = nn.Dropout3d(p=0.5)
        self.dropout2 = nn.Dropout3d(p=0.3)
        self.dropout3 = nn.Dropout3d(p=0.2)
        self.dropout4 = nn.Dropout3d(p=0.1)
        _kaiming_init_convs(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(B, in_channels, D, H, W) -> (dsv1, dsv2, dsv3, dsv4), each (B, n_classes, D, H, W)."""
        with _keep_relu_outputs_as_inputs(self):
            conv1, conv2, conv3, conv4, center = self._encode(x)
            up4 = self.dropout1(self.up_concat4(conv4, center))
            up3 = self.dropout2(self.up_concat3(conv3, up4))
            up2 = self.dropout3(self.up_concat2(conv2, up3))
            up1 = self.dropout4(self.up_concat1(conv1, up2))
            heads = (self.dsv1(up1), self.dsv2(up2), self.dsv3(up3), self.dsv4(up4))
        return tuple(h.contiguous() for h in heads)  # type: ignore[return-value]


unet_3D_dv_semi = unet_3D_ds
"""SSL4MIS's name for :class:`unet_3D_ds`, kept so users' URPC scripts still import."""
