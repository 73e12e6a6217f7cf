"""One rule for reading the segmentation logits out of any network's output.

- a tensor: the logits themselves (``unet_3D``, ``VNet``);
- a pair ``(dis, logits)``: the dual-task networks (``unet_3D_dt``, ``VNet_dt``) -> ``logits``;
- three or more maps: deep supervision (``unet_3D_ds``), finest first -> the first, full-resolution one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

from torch import Tensor

__all__ = ["segmentation_logits"]

NetworkOutput = Union[Tensor, Sequence[Tensor]]


def segmentation_logits(output: NetworkOutput, who: str | None = None) -> Tensor:
    """The ``(B, K, D, H, W)`` segmentation logits of ``output`` (see the module docstring).

    Args:
        output: what a network returned.
        who: names the caller in the error message (e.g. the ``--method``).
    Raises:
        ValueError: for an empty sequence or anything that is not a tensor or a sequence of tensors.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and all(isinstance(o, Tensor) for o in output):
        return output[1] if len(output) == 2 else output[0]
    prefix = f"--method {who}: " if who else ""
    raise ValueError(f"{prefix}cannot read segmentation logits from a network output of type {type(output).__name__}"
                     + (f" with {len(output)} elements" if isinstance(output, (tuple, list)) else ""))
