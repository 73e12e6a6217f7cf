"""One rule for reading the segmentation logits out of any network's output.

- a tensor: the logits themselves (``unet_3D``, ``VNet``);
- a pair ``(dis, logits)``: the dual-task networks (``unet_3D_dt``, ``VNet_dt``) -> ``logits``;
- three or more maps: deep supervision (``unet_3D_ds``), finest first -> the first, full-resolution one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

from torch import Tensor

__all__ = ["same_shaped_maps", "segmentation_logits"]

NetworkOutput = Union[Tensor, Sequence[Tensor]]


def segmentation_logits(output: NetworkOutput, method: str | None = None) -> Tensor:
    """The ``(B, K, D, H, W)`` segmentation logits of ``output`` (see the module docstring).

    Args:
        output: what a network returned.
        method: a training method's name: its loss takes logits or ``(dis, logits)`` only, so deep-supervision maps
            are refused with a message naming it. None (default, prediction) reads all three forms.
    Raises:
        ValueError: for an empty sequence, anything that is not a tensor or a sequence of tensors, or (with
            ``method``) three or more maps.
    """
    is_maps = isinstance(output, (tuple, list)) and output and all(isinstance(o, Tensor) for o in output)
    if isinstance(output, Tensor):
        return output
    if is_maps and (len(output) == 2 or method is None):
        return output[1] if len(output) == 2 else output[0]
    found = f"a {type(output).__name__}" + (f" of {len(output)} elements" if isinstance(output, (tuple, list)) else "")
    if method is not None:
        hint = " (unet_3D_ds is for --method urpc)" if is_maps else ""
        raise ValueError(f"--method {method} needs a --model returning logits or (dis, logits), such as unet_3D, "
                         f"unet_3D_dt, vnet or vnet_dt; the network returned {found}{hint}")
    raise ValueError(f"cannot read segmentation logits from a network output of {found}")


def same_shaped_maps(output: NetworkOutput, minimum: int, method: str, wanted: str) -> list[Tensor]:
    """The ``minimum`` or more same-shaped logits maps of a multi-output network (deep supervision, several
    decoders), or a one-line error naming the method and the network it needs.

    Args:
        output: what the network returned.
        minimum: the fewest maps the method can use.
        method: the ``--method`` name, for the message.
        wanted: what the method needs, for the message, e.g. ``"a deep-supervision --model ... such as unet_3D_ds"``.
    Raises:
        ValueError: for another output form.
    """
    if (
        isinstance(output, (tuple, list))
        and len(output) >= minimum
        and all(isinstance(o, Tensor) and o.shape == output[0].shape for o in output)
    ):
        return list(output)
    if isinstance(output, (tuple, list)):
        found = f"a {type(output).__name__} of {len(output)} outputs"
        if all(isinstance(o, Tensor) for o in output):
            found += " shaped " + ", ".join(str(tuple(o.shape)) for o in output)
    else:
        found = f"a single {type(output).__name__}"
    raise ValueError(f"--method {method} needs {wanted}; the network returned {found}")
