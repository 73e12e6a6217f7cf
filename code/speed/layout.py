"""Channels-last (``torch.channels_last_3d``) weights and activations, with outputs in the default layout."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["to_channels_last"]


def _contiguous(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.contiguous()
    if isinstance(output, (tuple, list)):
        return type(output)(_contiguous(o) for o in output)
    return output


def _contiguous_outputs(module: nn.Module, args: Any, output: Any) -> Any:
    return _contiguous(output)


def to_channels_last(net: nn.Module) -> nn.Module:
    """Store ``net``'s 5-D weights in ``torch.channels_last_3d`` and return its outputs contiguous (in place).

    Convolutions follow their weight's layout, so every activation inside is then channels-last; inputs may come in
    either layout. ``state_dict`` keys, shapes and values do not change (``load_state_dict`` copies into any
    layout). Output values are those of the contiguous network up to float rounding of the convolutions.
    """
    net.to(memory_format=torch.channels_last_3d)
    net.register_forward_hook(_contiguous_outputs)
    return net
