"""The :class:`methods.base.Passes` of the speed door: dropout masks drawn ahead, memory kept around the teacher."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from methods.base import Passes
from speed.allocator import keeping_freed_memory
from speed.dropout import can_draw_ahead, draw_masks_ahead

__all__ = ["PredrawnPasses"]


class PredrawnPasses(Passes):
    """Passes for networks whose dropout masks can be drawn ahead (``speed.dropout``).

    :meth:`reserve_randomness` draws a later forward's masks now, and :meth:`forward_in_pieces` runs a batch as
    forwards of fewer rows with the masks of one forward of the whole batch, so both keep the random stream of the
    plain order. On CPU, with ``keep_memory_around_teacher``, glibc keeps freed memory during the teacher's passes
    (``speed.allocator.keeping_freed_memory``).
    """

    def __init__(self, keep_memory_around_teacher: bool = False) -> None:
        self.keep_memory_around_teacher = keep_memory_around_teacher

    def around_teacher(self) -> AbstractContextManager[Any]:
        return keeping_freed_memory() if self.keep_memory_around_teacher else contextlib.nullcontext()

    def can_reserve(self, net: nn.Module) -> bool:
        return can_draw_ahead(net)

    def reserve_randomness(self, net: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> None:
        draw_masks_ahead(net, input_shape, dtype)

    def forward_in_pieces(self, net: nn.Module, x: Tensor, rows: int,
                          read: Callable[[Any], Tensor] | None = None) -> Any:
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        if not can_draw_ahead(net):
            return super().forward_in_pieces(net, x, rows, read)
        draw_masks_ahead(net, x.shape, x.dtype)
        pieces = [net(piece) if read is None else read(net(piece)) for piece in x.split(rows)]
        if len(pieces) == 1:
            return pieces[0]
        if isinstance(pieces[0], Tensor):
            return torch.cat(pieces)
        return type(pieces[0])(torch.cat(parts) for parts in zip(*pieces))
