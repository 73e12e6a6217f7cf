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

Optimisations that keep the maths (fused norm, channels-last, dropout masks drawn ahead) are applied from outside
by swapping modules (``code/speed``); this file is the published network.

Note:
    Every spatial side of the input must be a multiple of 16 (four poolings by 2); ``forward`` raises a
    ``ValueError`` otherwise. With the norm on (``is_batchnorm=True``) the 1/16 bottleneck must hold more than
    one voxel, so ``(16, 16, 16)`` is refused too. ``(96, 96, 96)`` training patches, ``(32, 48, 32)`` and
    ``(16, 16, 32)`` work.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from networks.conv import Conv3d
from networks.input_checks import check_volume

__all__ = [
    "unet_3D",
    "unet_3D_dt",
    "unet_3D_ds",
    "unet_3D_dv_semi",
    "UnetConv3",
    "UnetUp3_CT",
    "UnetDsv3",
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


class UnetConv3(nn.Module):
    """Two (Conv3d k3 p1 -> InstanceNorm3d(affine=False) -> ReLU) layers, keys ``conv1.0.*`` and ``conv2.0.*``.

    Args:
        in_size: input channels.
        out_size: output channels.
        is_batchnorm: add the InstanceNorm3d (the original's name for it). Default True.

    Shapes: (B, in_size, D, H, W) -> (B, out_size, D, H, W).
    """

    def __init__(self, in_size: int, out_size: int, is_batchnorm: bool = True) -> None:
        super().__init__()
        self.conv1 = self._layer(in_size, out_size, is_batchnorm)
        self.conv2 = self._layer(out_size, out_size, is_batchnorm)
        # The original initialises here and again model-wide. Repeating both keeps the random stream, so
        # a given seed gives the same starting weights as the released code.
        _kaiming_init_convs(self)

    @staticmethod
    def _layer(in_size: int, out_size: int, is_batchnorm: bool) -> nn.Sequential:
        layers: list[nn.Module] = [Conv3d(in_size, out_size, kernel_size=3, stride=1, padding=1)]
        if is_batchnorm:
            layers.append(nn.InstanceNorm3d(out_size))
        layers.append(nn.ReLU(inplace=True))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))


class UnetUp3_CT(nn.Module):
    """Decoder step: trilinear x2 upsampling of the deeper map, ``cat([skip, up], 1)``, then a :class:`UnetConv3`.

    Args:
        in_size: channels of the deeper map.
        out_size: channels of the skip map and of the output.
        is_batchnorm: passed to the block.

    Shapes: skip (B, out_size, 2D, 2H, 2W), deeper (B, in_size, D, H, W) -> (B, out_size, 2D, 2H, 2W).
    """

    def __init__(self, in_size: int, out_size: int, is_batchnorm: bool = True) -> None:
        super().__init__()
        self.conv = UnetConv3(in_size + out_size, out_size, is_batchnorm)
        self.up = nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False)

    def forward(self, skip: Tensor, deeper: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(deeper)], dim=1))


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
    """Encoder, bottleneck and decoder blocks shared by the models below (registered in the original order).

    After the blocks, a model adds its heads (:meth:`_add_heads`); then every conv is Kaiming-initialised once
    more, model-wide, as released. Arguments as :class:`unet_3D`.
    """

    def __init__(
        self,
        feature_scale: int = 4,
        n_classes: int = 2,
        is_deconv: bool = True,
        in_channels: int = 1,
        is_batchnorm: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.feature_scale = feature_scale
        self.is_batchnorm = is_batchnorm
        f = _filters(feature_scale)
        self.filters = f
        self.conv1 = UnetConv3(in_channels, f[0], is_batchnorm)
        self.maxpool1 = nn.MaxPool3d(kernel_size=2)
        self.conv2 = UnetConv3(f[0], f[1], is_batchnorm)
        self.maxpool2 = nn.MaxPool3d(kernel_size=2)
        self.conv3 = UnetConv3(f[1], f[2], is_batchnorm)
        self.maxpool3 = nn.MaxPool3d(kernel_size=2)
        self.conv4 = UnetConv3(f[2], f[3], is_batchnorm)
        self.maxpool4 = nn.MaxPool3d(kernel_size=2)
        self.center = UnetConv3(f[3], f[4], is_batchnorm)
        self.up_concat4 = UnetUp3_CT(f[4], f[3], is_batchnorm)
        self.up_concat3 = UnetUp3_CT(f[3], f[2], is_batchnorm)
        self.up_concat2 = UnetUp3_CT(f[2], f[1], is_batchnorm)
        self.up_concat1 = UnetUp3_CT(f[1], f[0], is_batchnorm)
        self.n_classes = n_classes
        self.is_deconv = is_deconv
        self._add_heads(n_classes)
        _kaiming_init_convs(self)

    def _add_heads(self, n_classes: int) -> None:
        """Register the model's output layers (and dropouts) after the trunk."""
        raise NotImplementedError

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

    Shapes:
        input (B, in_channels, D, H, W) with D, H, W multiples of 16 -> logits (B, n_classes, D, H, W).

    Raises:
        ValueError: for ``feature_scale`` outside (0, 64] at construction, or in ``forward`` for an input with
            the wrong rank or channel count, a spatial side that is not a multiple of 16, or (with the norm on)
            a size of only (16, 16, 16).
    """

    def _add_heads(self, n_classes: int) -> None:
        """``final`` (Conv3d k1, ``filters[0]`` -> ``n_classes``) and the two Dropout(p=0.3)."""
        self.final = nn.Conv3d(self.filters[0], n_classes, kernel_size=1)
        self.dropout1 = nn.Dropout(p=0.3)
        self.dropout2 = nn.Dropout(p=0.3)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, D, H, W) -> logits (B, n_classes, D, H, W)."""
        conv1, conv2, conv3, conv4, center = self._encode(x)
        center = self.dropout1(center)
        up4 = self.up_concat4(conv4, center)
        up3 = self.up_concat3(conv3, up4)
        up2 = self.up_concat2(conv2, up3)
        up1 = self.dropout2(self.up_concat1(conv1, up2))
        return self.final(up1)


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
        feature_scale, n_classes, is_deconv, in_channels, is_batchnorm: as :class:`unet_3D`.

    Shapes:
        input (B, in_channels, D, H, W), sides multiples of 16 -> tuple ``(dsv1, dsv2, dsv3, dsv4)`` of logits,
        each (B, n_classes, D, H, W), finest decoder level first.

    Raises:
        ValueError: as :class:`unet_3D`.
    """

    def _add_heads(self, n_classes: int) -> None:
        """The four deep-supervision heads ``dsv4`` .. ``dsv1`` and the four Dropout3d."""
        f = self.filters
        self.dsv4 = UnetDsv3(f[3], n_classes, scale_factor=8)
        self.dsv3 = UnetDsv3(f[2], n_classes, scale_factor=4)
        self.dsv2 = UnetDsv3(f[1], n_classes, scale_factor=2)
        self.dsv1 = nn.Conv3d(f[0], n_classes, kernel_size=1)
        self.dropout1 = nn.Dropout3d(p=0.5)
        self.dropout2 = nn.Dropout3d(p=0.3)
        self.dropout3 = nn.Dropout3d(p=0.2)
        self.dropout4 = nn.Dropout3d(p=0.1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(B, in_channels, D, H, W) -> (dsv1, dsv2, dsv3, dsv4), each (B, n_classes, D, H, W)."""
        conv1, conv2, conv3, conv4, center = self._encode(x)
        up4 = self.dropout1(self.up_concat4(conv4, center))
        up3 = self.dropout2(self.up_concat3(conv3, up4))
        up2 = self.dropout3(self.up_concat2(conv2, up3))
        up1 = self.dropout4(self.up_concat1(conv1, up2))
        return self.dsv1(up1), self.dsv2(up2), self.dsv3(up3), self.dsv4(up4)


unet_3D_dv_semi = unet_3D_ds
"""SSL4MIS's name for :class:`unet_3D_ds`, kept so users' URPC scripts still import."""
