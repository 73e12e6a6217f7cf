"""Keep cheap-to-recompute activations as their sources while a graph is recorded (saved-tensor hooks).

In a U-Net with fused norm + ReLU blocks (``speed.fused_norm``), three kinds of saved activations can be rebuilt
from tensors that autograd keeps anyway:

* the output of a fused norm + ReLU (saved by the next conv or a max-pool) is ``relu(x_hat)``, and the fused step
  saves ``x_hat``: one full-size activation less per conv layer;
* a decoder's ``cat([skip, up(deeper)])`` (saved by its first conv) is rebuilt from ``skip`` and ``deeper`` with
  one upsampling and one copy in the backward (:class:`RecomputedUpConcat` marks it);
* a dropout output (saved by the next conv) is rebuilt from its source and its boolean mask
  (``speed.dropout.PredrawnDropout`` marks it).

Recomputations give the saved values bit for bit (the same deterministic ops on the same inputs).
:func:`keep_activations_as_sources` installs the hooks around every forward of a network. They apply to everything
saved inside that forward, so a caller's own ``saved_tensors_hooks`` (e.g. ``save_on_cpu``) do not reach it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from networks.unet_3D import UnetUp3_CT
from speed.fused_norm import FusedConvNormReLU, fused_x_hat, is_fused_norm_output

__all__ = ["RecomputedUpConcat", "keep_activations_as_sources", "mark_recomputable"]

_RECOMPUTE = "_speed_recompute"  # attribute of a tensor: the object that rebuilds it


class _ReluOf:
    """A saved activation kept as the input of its ReLU."""

    __slots__ = ("x_hat",)

    def __init__(self, x_hat: Tensor) -> None:
        self.x_hat = x_hat

    def recompute(self) -> Tensor:
        return torch.relu(self.x_hat)


class _Dropped:
    """A saved dropout output kept as its source and boolean mask."""

    __slots__ = ("source", "mask", "p")

    def __init__(self, x: Tensor, mask: Tensor, p: float) -> None:
        self.source, self.mask, self.p = _as_source(x), mask, p

    def recompute(self) -> Tensor:
        x = _unpack(self.source)
        return x * self.mask.to(x.dtype).div_(1.0 - self.p)


class _UpsampleConcat:
    """A saved ``cat([skip, up(deeper)])`` kept as its two sources."""

    __slots__ = ("up", "skip", "deeper")

    def __init__(self, up: nn.Module, skip: Tensor, deeper: Tensor) -> None:
        self.up, self.skip, self.deeper = up, _as_source(skip), _as_source(deeper)

    def recompute(self) -> Tensor:
        return torch.cat([_unpack(self.skip), self.up(_unpack(self.deeper))], dim=1)


_RECOMPUTABLE = (_ReluOf, _Dropped, _UpsampleConcat)


def _as_source(t: Tensor) -> Any:
    """What to keep of ``t``: its norm's ``x_hat`` if it is a fused norm + ReLU output, else ``t`` itself."""
    return _ReluOf(fused_x_hat(t)) if is_fused_norm_output(t) else t


def _pack(t: Tensor) -> Any:
    recompute = getattr(t, _RECOMPUTE, None)
    return recompute if recompute is not None else _as_source(t)


def _unpack(packed: Any) -> Tensor:
    return packed.recompute() if isinstance(packed, _RECOMPUTABLE) else packed


def mark_recomputable(out: Tensor, source: Tensor, mask: Tensor, p: float) -> None:
    """Let a hooked forward keep the dropout output ``out = source * mask / (1 - p)`` as ``(source, mask)``."""
    setattr(out, _RECOMPUTE, _Dropped(source, mask, p))


class RecomputedUpConcat(UnetUp3_CT):
    """:class:`networks.unet_3D.UnetUp3_CT` whose concatenation is rebuilt in the backward instead of kept.

    Same submodules (``conv``, ``up``), parameters and outputs; built from an existing block by :meth:`from_block`.
    """

    @classmethod
    def from_block(cls, block: UnetUp3_CT) -> RecomputedUpConcat:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.conv, new.up = block.conv, block.up
        new.train(block.training)
        return new

    def forward(self, skip: Tensor, deeper: Tensor) -> Tensor:
        merged = torch.cat([skip, self.up(deeper)], dim=1)
        if merged.requires_grad:
            setattr(merged, _RECOMPUTE, _UpsampleConcat(self.up, skip, deeper))
        return self.conv(merged)


class _HooksAroundForward:
    """Forward pre-hook and (always-called) forward hook that hold ``saved_tensors_hooks`` while a graph is recorded."""

    def __init__(self) -> None:
        self.active: list[Any] = []

    def enter(self, module: nn.Module, args: Any) -> None:
        hooks = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack) if torch.is_grad_enabled() else None
        if hooks is not None:
            hooks.__enter__()
        self.active.append(hooks)

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        hooks = self.active.pop() if self.active else None
        if hooks is not None:
            hooks.__exit__(None, None, None)


def keep_activations_as_sources(net: nn.Module) -> nn.Module:
    """Rebuild ``net``'s fused-norm outputs, decoder concatenations and dropout outputs in the backward (in place).

    Swaps each ``UnetUp3_CT`` whose block is fused for a :class:`RecomputedUpConcat` and installs the saved-tensor
    hooks around ``net``'s forward. Call after :func:`speed.fused_norm.fuse_norm_relu`; a network without fused
    blocks is returned unchanged.
    """
    if not any(isinstance(m, FusedConvNormReLU) for m in net.modules()):
        return net
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is UnetUp3_CT and isinstance(child.conv.conv1, FusedConvNormReLU):
                setattr(parent, name, RecomputedUpConcat.from_block(child))
    hooks = _HooksAroundForward()
    net.register_forward_pre_hook(hooks.enter)
    net.register_forward_hook(hooks.leave, always_call=True)
    return net
