"""Dropout whose masks can be drawn ahead of the forward, in the logical (B, C, D, H, W) order.

:class:`PredrawnDropout` is an ``nn.Dropout`` (same ``p``, same values, no parameters) swapped into a network by
:func:`predraw_dropout`. It differs in two ways, neither of which changes the maths:

* a channels-last activation gets the mask a contiguous one would get: ``F.dropout`` fills its noise in memory
  order, so for the same seed another layout would drop other elements;
* :func:`draw_masks_ahead` draws now, from torch's global RNG and with exactly the calls and order of the forward,
  the masks that a train-mode forward of a given input shape would draw. The next forwards use them row by row:
  one forward of that shape, or several of fewer rows that together make up its batch, in order. Other random work
  can run in between and gets the same random numbers as if the forward had run first, and a batch can run in
  smaller pieces with the masks of one forward of the whole batch.

On CPU the masks come from :func:`speed.bernoulli.bernoulli_mask` (the same values as ``bernoulli_``). Drawing ahead
needs to know the shape each dropout sees; :func:`dropout_input_shapes` knows it for the U-Nets of
``networks.unet_3D`` (bottleneck, then the last decoder map), and other networks cannot draw ahead.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from networks.input_checks import SIDE_MULTIPLE, check_volume
from networks.unet_3D import unet_3D
from speed.bernoulli import bernoulli_mask
from speed.recompute import mark_recomputable

__all__ = ["PredrawnDropout", "can_draw_ahead", "draw_masks_ahead", "dropout_input_shapes", "predraw_dropout"]


class _MaskedDropout(torch.autograd.Function):
    """``x * (mask / (1 - p))`` (the values ``F.dropout`` computes), saving the boolean mask, not a float noise."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, mask: Tensor, p: float) -> Tensor:
        ctx.save_for_backward(mask)
        ctx.p = p
        return x * mask.to(x.dtype).div_(1.0 - p)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask.to(grad.dtype).div_(1.0 - ctx.p), None, None


class PredrawnDropout(nn.Dropout):
    """``nn.Dropout`` with masks drawn in the logical order, optionally ahead of the forward (module docstring).

    Shapes: any (B, ...) -> the same shape.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__(p, inplace)
        self._ahead: tuple[Tensor, int] | None = None  # (mask drawn ahead, rows used so far)
        self._drawn_with: list[PredrawnDropout] = []  # the dropouts whose masks were drawn together with this one

    def draw(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """The boolean mask ``F.dropout`` would draw for a contiguous input of ``shape``."""
        return bernoulli_mask(shape, 1.0 - self.p, dtype, device)

    def hold(self, mask: Tensor, drawn_with: list[PredrawnDropout] | None = None) -> None:
        """Use ``mask`` (drawn by :meth:`draw`) for the coming train-mode forwards, row by row.

        ``drawn_with``: the dropouts whose masks were drawn for the same forward; a forward that does not fit drops
        all of theirs too, so none is left for a later forward.
        """
        self._ahead = (mask, 0)
        self._drawn_with = drawn_with if drawn_with is not None else [self]

    def _take(self, x: Tensor) -> Tensor | None:
        if self._ahead is None:
            return None
        mask, used = self._ahead
        rows = x.shape[0]
        if tuple(x.shape[1:]) != tuple(mask.shape[1:]) or used + rows > mask.shape[0]:
            for dropout in self._drawn_with:
                dropout._ahead = None
            raise ValueError(f"dropout masks were drawn for an input {tuple(mask.shape)} ({used} rows used), but "
                             f"the input is {tuple(x.shape)}")
        self._ahead = (mask, used + rows) if used + rows < mask.shape[0] else None
        return mask[used : used + rows]

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            self._ahead = None
            return x
        mask = self._take(x)
        p = self.p
        if p == 0.0 or (mask is None and (x.is_contiguous() or p == 1.0)):
            return F.dropout(x, p, True, self.inplace)
        if mask is None:
            mask = self.draw(x.shape, x.dtype, x.device)
        if not (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling():
            return x * mask.to(x.dtype).div_(1.0 - p)
        out = _MaskedDropout.apply(x, mask, p)
        mark_recomputable(out, x, mask, p)
        return out


def predraw_dropout(net: nn.Module) -> int:
    """Swap every plain ``nn.Dropout`` inside ``net`` for a :class:`PredrawnDropout` of the same ``p``; return the
    number swapped. No parameters or ``state_dict`` keys change."""
    swapped = 0
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                new = PredrawnDropout(child.p, child.inplace)
                new.train(child.training)
                setattr(parent, name, new)
                swapped += 1
    return swapped


def dropout_input_shapes(net: nn.Module, input_shape: Sequence[int]) -> list[tuple[PredrawnDropout, tuple[int, ...]]]:
    """``(dropout, shape it sees)`` for each dropout of a forward of ``input_shape``, in the forward's order.

    Raises:
        ValueError: if ``net`` cannot draw ahead (:func:`can_draw_ahead`) or ``input_shape`` is not an input it takes.
    """
    if not can_draw_ahead(net):
        raise ValueError(f"{type(net).__name__} cannot draw its dropout masks ahead (a unet_3D with predraw_dropout)")
    shape = tuple(int(s) for s in input_shape)
    check_volume(torch.empty(shape, device="meta"), net.in_channels, type(net).__name__, net.is_batchnorm)
    rows, spatial = shape[0], shape[2:]
    bottleneck = (rows, net.filters[4], *(s // SIDE_MULTIPLE for s in spatial))
    last_decoder = (rows, net.filters[0], *spatial)
    return [(net.dropout1, bottleneck), (net.dropout2, last_decoder)]


def can_draw_ahead(net: nn.Module) -> bool:
    """True for a :class:`networks.unet_3D.unet_3D` (or ``unet_3D_dt``) whose dropouts are :class:`PredrawnDropout`."""
    return isinstance(net, unet_3D) and all(isinstance(d, PredrawnDropout) for d in (net.dropout1, net.dropout2))


def draw_masks_ahead(net: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> None:
    """Draw now the dropout masks of a train-mode forward of ``input_shape`` (module docstring); in eval mode, none.

    Raises:
        ValueError: as :func:`dropout_input_shapes`.
    """
    sites = dropout_input_shapes(net, input_shape)
    if not net.training:
        return
    device = next(net.parameters()).device
    together = [dropout for dropout, _ in sites]
    for dropout, shape in sites:
        dropout.hold(dropout.draw(shape, dtype, device), together)
