"""Build a 3-D network by name, as the original ``net_factory_3d`` does (minus its hard-coded ``.cuda()``).

The caller moves the network to its device (``net_factory_3d(...).to(device)``).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from networks.mcnet import MCNet3d_v2
from networks.unet_3D import unet_3D, unet_3D_ds, unet_3D_dt
from networks.vnet import VNet, VNet_dt

__all__ = ["net_factory_3d", "NETWORKS_3D", "width_kwargs"]


def _vnet(in_chns: int, class_num: int, **kwargs: Any) -> nn.Module:
    kwargs = {"normalization": "batchnorm", "has_dropout": True, **kwargs}
    return VNet(n_channels=in_chns, n_classes=class_num, **kwargs)


def _vnet_dt(in_chns: int, class_num: int, **kwargs: Any) -> nn.Module:
    kwargs = {"normalization": "batchnorm", "has_dropout": True, **kwargs}
    return VNet_dt(n_channels=in_chns, n_classes=class_num, **kwargs)


def _mcnet3d_v2(in_chns: int, class_num: int, **kwargs: Any) -> nn.Module:
    kwargs = {"normalization": "batchnorm", "has_dropout": True, **kwargs}  # MC-Net+'s mode="train"
    return MCNet3d_v2(n_channels=in_chns, n_classes=class_num, **kwargs)


NETWORKS_3D: dict[str, Callable[..., nn.Module]] = {
    "unet_3D": lambda in_chns, class_num, **kw: unet_3D(n_classes=class_num, in_channels=in_chns, **kw),
    "unet_3D_dt": lambda in_chns, class_num, **kw: unet_3D_dt(n_classes=class_num, in_channels=in_chns, **kw),
    "unet_3D_ds": lambda in_chns, class_num, **kw: unet_3D_ds(n_classes=class_num, in_channels=in_chns, **kw),
    "unet_3D_dv_semi": lambda in_chns, class_num, **kw: unet_3D_ds(n_classes=class_num, in_channels=in_chns, **kw),
    "vnet": _vnet,
    "vnet_dt": _vnet_dt,
    "mcnet3d_v2": _mcnet3d_v2,
}
"""Name -> builder ``(in_chns, class_num, **kwargs) -> nn.Module``. ``unet_3D_dv_semi`` is SSL4MIS's name for
``unet_3D_ds``."""


def width_kwargs(net_type: str, feature_scale: int = 4) -> dict[str, int]:
    """The constructor keyword that sets the width of ``net_type`` from the one ``--feature_scale`` divisor.

    The U-Nets take it as is (first stage ``64 // feature_scale`` channels); the V-Nets and MC-Net+ get
    ``n_filters = 64 // feature_scale``, so the default 4 gives their published 16 and 8 halves them.

    Raises:
        ValueError: if ``feature_scale`` is not in 1..64.
    """
    if not 1 <= feature_scale <= 64:
        raise ValueError(f"feature_scale must be in 1..64, got {feature_scale}")
    if net_type.startswith("unet"):
        return {"feature_scale": feature_scale}
    return {"n_filters": 64 // feature_scale}


def net_factory_3d(net_type: str = "unet_3D", in_chns: int = 1, class_num: int = 2, **kwargs: Any) -> nn.Module:
    """Build the 3-D network ``net_type`` on the CPU.

    Args:
        net_type: one of ``NETWORKS_3D``: ``"unet_3D"``, ``"unet_3D_dt"``, ``"unet_3D_ds"`` (alias
            ``"unet_3D_dv_semi"``), ``"vnet"``, ``"vnet_dt"``, ``"mcnet3d_v2"`` (MC-Net+). Default ``"unet_3D"``.
        in_chns: input channels. Default 1.
        class_num: output classes. Default 2.
        **kwargs: passed to the constructor, e.g. ``feature_scale=8`` or ``is_batchnorm=False`` for the U-Nets,
            ``n_filters``, ``normalization`` or ``has_dropout`` for the V-Nets. The V-Nets default to
            ``normalization="batchnorm", has_dropout=True`` here, as in SSL4MIS's factory.

    Returns:
        The network, with parameters on the CPU (move it with ``.to(device)``).

    Raises:
        ValueError: if ``net_type`` is not a known name (the message lists the valid names).
        TypeError: if a keyword in ``kwargs`` is not an argument of that network.
    """
    builder = NETWORKS_3D.get(net_type)
    if builder is None:
        raise ValueError(f"unknown net_type {net_type!r}; valid names: {sorted(NETWORKS_3D)}")
    return builder(in_chns, class_num, **kwargs)
