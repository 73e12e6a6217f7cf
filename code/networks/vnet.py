"""V-Net of UA-MT / DTC (Yu et al. 2019, Luo et al. 2021): single-head ``VNet`` and dual-task ``VNet_dt``.

The UG-MCL paper's network is this trunk with two 1x1x1 heads on the last decoder features
(``tanh`` SDF regression and segmentation logits), i.e. :class:`VNet_dt`. Submodule names follow the
UA-MT / DTC code (``block_one`` .. ``block_nine``, ``block_one_dw``, ``block_five_up``, ``out_conv``), so their
checkpoints load as is.

Trunk with ``n = n_filters`` (16 by default):

* encoder stages of 1, 2, 3, 3, 3 convs (Conv3d k3 p1 -> norm -> ReLU) with n, 2n, 4n, 8n, 16n channels,
  separated by Conv3d k2 s2 (-> norm -> ReLU) downsampling that doubles the channels;
* decoder: ConvTranspose3d k2 s2 (-> norm -> ReLU) halving the channels, **added** to the encoder map of the
  same level, then stages of 3, 3, 2, 1 convs;
* Dropout3d(p=0.5) on the deepest features and on the last decoder features when ``has_dropout``.

Note:
    Every spatial side of the input must be a multiple of 16 (four stride-2 downsamplings); ``forward`` raises
    a ``ValueError`` otherwise; with ``instancenorm`` the deepest level must also hold more than one voxel,
    so ``(16, 16, 16)`` is refused. (With ``batchnorm`` in train mode a batch of one 16^3 volume fails inside
    torch for the same reason.)
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor, nn

from networks.conv import Conv3d
from networks.input_checks import check_volume

__all__ = ["VNet", "VNet_dt", "Normalization", "NORMALIZATIONS"]

Normalization = Literal["batchnorm", "groupnorm", "instancenorm", "none"]
NORMALIZATIONS: tuple[str, ...] = ("batchnorm", "groupnorm", "instancenorm", "none")
_GROUPS = 16  # GroupNorm groups in UA-MT / DTC


def _norm(normalization: str, channels: int) -> list[nn.Module]:
    """The normalisation layer after a conv, as a 0- or 1-element list.

    GroupNorm uses 16 groups as in the original, or ``gcd(16, channels)`` when ``channels`` is not a multiple
    of 16 (the original would crash there; this only matters for ``n_filters`` below 16).
    """
    if normalization == "batchnorm":
        return [nn.BatchNorm3d(channels)]
    if normalization == "groupnorm":
        return [nn.GroupNorm(num_groups=math.gcd(_GROUPS, channels), num_channels=channels)]
    if normalization == "instancenorm":
        return [nn.InstanceNorm3d(channels)]
    return []


class ConvBlock(nn.Module):
    """``n_stages`` x (Conv3d k3 p1 -> norm -> ReLU); shapes (B, C_in, D, H, W) -> (B, C_out, D, H, W)."""

    def __init__(self, n_stages: int, n_filters_in: int, n_filters_out: int, normalization: str = "none") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n_stages):
            layers.append(Conv3d(n_filters_in if i == 0 else n_filters_out, n_filters_out, 3, padding=1))
            layers += _norm(normalization, n_filters_out)
            layers.append(nn.ReLU(inplace=True))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class DownsamplingConvBlock(nn.Module):
    """Conv3d k2 s2 -> norm -> ReLU; shapes (B, C_in, D, H, W) -> (B, C_out, D/2, H/2, W/2)."""

    def __init__(self, n_filters_in: int, n_filters_out: int, stride: int = 2, normalization: str = "none") -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv3d(n_filters_in, n_filters_out, stride, padding=0, stride=stride)]
        layers += _norm(normalization, n_filters_out)
        layers.append(nn.ReLU(inplace=True))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class UpsamplingDeconvBlock(nn.Module):
    """ConvTranspose3d k2 s2 -> norm -> ReLU; shapes (B, C_in, D, H, W) -> (B, C_out, 2D, 2H, 2W)."""

    def __init__(self, n_filters_in: int, n_filters_out: int, stride: int = 2, normalization: str = "none") -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ConvTranspose3d(n_filters_in, n_filters_out, stride, padding=0, stride=stride)]
        layers += _norm(normalization, n_filters_out)
        layers.append(nn.ReLU(inplace=True))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def check_vnet_options(normalization: str, n_filters: int) -> None:
    """Refuse an unknown ``normalization`` or a non-positive ``n_filters`` (one-line ValueError)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, got {normalization!r}")
    if n_filters < 1:
        raise ValueError(f"n_filters must be a positive integer, got {n_filters!r}")


def add_encoder_stages(module: nn.Module, n_channels: int, n: int, norm: str) -> None:
    """Register the V-Net encoder on ``module``: ``block_one`` .. ``block_five`` (1, 2, 3, 3, 3 convs with n .. 16n
    channels) and the k2 s2 downsamplings ``block_one_dw`` .. ``block_four_dw``, in the published order (so the
    keys and the seeded initial weights are the released ones)."""
    module.block_one = ConvBlock(1, n_channels, n, norm)
    module.block_one_dw = DownsamplingConvBlock(n, 2 * n, normalization=norm)
    module.block_two = ConvBlock(2, 2 * n, 2 * n, norm)
    module.block_two_dw = DownsamplingConvBlock(2 * n, 4 * n, normalization=norm)
    module.block_three = ConvBlock(3, 4 * n, 4 * n, norm)
    module.block_three_dw = DownsamplingConvBlock(4 * n, 8 * n, normalization=norm)
    module.block_four = ConvBlock(3, 8 * n, 8 * n, norm)
    module.block_four_dw = DownsamplingConvBlock(8 * n, 16 * n, normalization=norm)
    module.block_five = ConvBlock(3, 16 * n, 16 * n, norm)


def encode_stages(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The five stage outputs of the encoder that :func:`add_encoder_stages` registered on ``module``, full
    resolution first: (B, n 2^k, D / 2^k, H / 2^k, W / 2^k) for k = 0 .. 4 (no dropout)."""
    x1 = module.block_one(x)
    x2 = module.block_two(module.block_one_dw(x1))
    x3 = module.block_three(module.block_two_dw(x2))
    x4 = module.block_four(module.block_three_dw(x3))
    x5 = module.block_five(module.block_four_dw(x4))
    return x1, x2, x3, x4, x5


class _VNetTrunk(nn.Module):
    """Encoder-decoder shared by :class:`VNet` and :class:`VNet_dt`; ``_features`` gives the last decoder map.

    After the trunk, a model adds its 1x1x1 heads (:meth:`_add_heads`). Arguments as :class:`VNet`.
    """

    def __init__(
        self,
        n_channels: int = 1,
        n_classes: int = 2,
        n_filters: int = 16,
        normalization: Normalization = "batchnorm",
        has_dropout: bool = False,
    ) -> None:
        super().__init__()
        check_vnet_options(normalization, n_filters)
        self.n_channels = n_channels
        self.has_dropout = has_dropout
        self.normalization = normalization
        n, norm = n_filters, normalization

        add_encoder_stages(self, n_channels, n, norm)
        self.block_five_up = UpsamplingDeconvBlock(16 * n, 8 * n, normalization=norm)

        self.block_six = ConvBlock(3, 8 * n, 8 * n, norm)
        self.block_six_up = UpsamplingDeconvBlock(8 * n, 4 * n, normalization=norm)
        self.block_seven = ConvBlock(3, 4 * n, 4 * n, norm)
        self.block_seven_up = UpsamplingDeconvBlock(4 * n, 2 * n, normalization=norm)
        self.block_eight = ConvBlock(2, 2 * n, 2 * n, norm)
        self.block_eight_up = UpsamplingDeconvBlock(2 * n, n, normalization=norm)
        self.block_nine = ConvBlock(1, n, n, norm)
        self.dropout = nn.Dropout3d(p=0.5)
        self._add_heads(n_filters, n_classes)

    def _add_heads(self, n_filters: int, n_classes: int) -> None:
        """Register the model's heads on the last decoder features (``n_filters`` channels)."""
        raise NotImplementedError

    def _features(self, x: Tensor, turnoff_drop: bool) -> Tensor:
        """(B, n_channels, D, H, W) -> last decoder features (B, n_filters, D, H, W)."""
        check_volume(x, self.n_channels, type(self).__name__, self.normalization == "instancenorm")
        drop = self.has_dropout and not turnoff_drop
        x1, x2, x3, x4, x5 = encode_stages(self, x)
        if drop:
            x5 = self.dropout(x5)
        x6 = self.block_six(self.block_five_up(x5) + x4)
        x7 = self.block_seven(self.block_six_up(x6) + x3)
        x8 = self.block_eight(self.block_seven_up(x7) + x2)
        x9 = self.block_nine(self.block_eight_up(x8) + x1)
        if drop:
            x9 = self.dropout(x9)
        return x9


class VNet(_VNetTrunk):
    """Single-head V-Net (UA-MT / DTC trunk) with a 1x1x1 segmentation head ``out_conv``.

    Args:
        n_channels: input channels. Default 1.
        n_classes: output channels. Default 2.
        n_filters: channels of the first stage (doubled at each level). Default 16.
        normalization: ``'batchnorm'`` (default), ``'groupnorm'`` (16 groups), ``'instancenorm'``
            (affine=False) or ``'none'``.
        has_dropout: Dropout3d(p=0.5) on the deepest and the last decoder features. Default False.

    Shapes:
        input (B, n_channels, D, H, W) with D, H, W multiples of 16 -> logits (B, n_classes, D, H, W).

    Raises:
        ValueError: for an unknown ``normalization`` or ``n_filters < 1`` at construction, or in ``forward`` for
            an input with the wrong rank or channel count, a spatial side that is not a multiple of 16, or (with
            ``instancenorm``) a size of only (16, 16, 16).
    """

    def _add_heads(self, n_filters: int, n_classes: int) -> None:
        """``out_conv``, the segmentation head."""
        self.out_conv = nn.Conv3d(n_filters, n_classes, 1, padding=0)

    def forward(self, x: Tensor, turnoff_drop: bool = False) -> Tensor:
        """(B, n_channels, D, H, W) -> logits (B, n_classes, D, H, W); ``turnoff_drop`` skips the dropout."""
        return self.out_conv(self._features(x, turnoff_drop))


class VNet_dt(_VNetTrunk):  # noqa: N801 - named like unet_3D_dt
    """Dual-task V-Net (the UG-MCL paper's network, DTC's dual-task V-Net): one trunk, two separate 1x1x1 heads.

    ``out_conv`` is the signed-distance head and ``out_conv2`` the segmentation head, named as in DTC so its
    checkpoints load. On the last decoder features ``h``:

        dis = tanh(out_conv(h)),    logits = out_conv2(h)

    Args:
        n_channels, n_classes, n_filters, normalization, has_dropout: as :class:`VNet`.

    Shapes:
        input (B, n_channels, D, H, W), sides multiples of 16 -> ``(dis, logits)``, each
        (B, n_classes, D, H, W), ``dis`` in (-1, 1) (negative inside the object, DTC convention).

    Raises:
        ValueError: as :class:`VNet`.
    """

    def _add_heads(self, n_filters: int, n_classes: int) -> None:
        """``out_conv`` (the SDF head, before the tanh) and ``out_conv2`` (the segmentation head)."""
        self.out_conv = nn.Conv3d(n_filters, n_classes, 1, padding=0)
        self.out_conv2 = nn.Conv3d(n_filters, n_classes, 1, padding=0)
        self.tanh = nn.Tanh()

    def forward(self, x: Tensor, turnoff_drop: bool = False) -> tuple[Tensor, Tensor]:
        """(B, n_channels, D, H, W) -> (tanh(sdf_head), seg_logits), each (B, n_classes, D, H, W)."""
        features = self._features(x, turnoff_drop)
        return self.tanh(self.out_conv(features)), self.out_conv2(features)
