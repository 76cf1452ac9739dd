"""The U-Net of Ronneberger et al. (2015) in the layout of milesial/Pytorch-UNet, generalised.

Why this module exists: it is the one model definition every trainer, benchmark and checkpoint
uses. It is a pure ``nn.Module``: distribution, mixed precision, SyncBatchNorm and activation
checkpointing are applied from outside (``unetdist.parallel``), so this file never changes for them.

Compared with the reference it adds ``depth`` (the reference is ``depth=4``), ``base_width``
(64 there) and ``norm``; with the defaults the parameters and their shapes are those of the
reference (31,036,546 parameters for 1 input channel and 2 classes). Stage names differ
(``downs.0`` instead of ``down1``, ``ups.0`` instead of ``up1``); the keys below them are the same.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

NORMS: tuple[str, ...] = ("batch", "group", "instance")
GROUP_NORM_MAX_GROUPS = 8


def group_count(channels: int) -> int:
    """Number of GroupNorm groups for ``channels`` channels: ``gcd(8, channels)``.

    Eight groups for every layer of models whose width is a multiple of 8 (all practical ones);
    the gcd keeps any other width valid (GroupNorm needs the group count to divide the channels)
    instead of failing at construction, degrading towards LayerNorm-like single groups.
    """
    return math.gcd(GROUP_NORM_MAX_GROUPS, channels)


def make_norm(norm: str, channels: int) -> nn.Module:
    """The normalisation layer after each 3x3 convolution.

    ``batch``: BatchNorm2d (the reference). ``group``: GroupNorm with :func:`group_count` groups,
    independent of the batch size (for tiny per-device batches). ``instance``: InstanceNorm2d with
    a learned affine and no running statistics, so training and evaluation normalise alike and
    the parameter count equals the other two.
    """
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True, track_running_stats=False)
    raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")


class DoubleConv(nn.Module):
    """(3x3 convolution without bias -> norm -> ReLU) x 2, as in the reference."""

    def __init__(
        self, in_channels: int, out_channels: int, mid_channels: int | None = None, norm: str = "batch"
    ) -> None:
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            make_norm(norm, mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """2x2 max-pooling (floor: odd sizes lose their last row/column) then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels, norm=norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Up-sample x2, pad to the skip's size, concatenate [skip, up], DoubleConv.

    ``bilinear``: parameter-free bilinear up-sampling (align_corners=True as the reference); the
    DoubleConv then halves the channels through ``mid_channels = in_channels // 2``.
    Otherwise a 2x2 stride-2 transposed convolution halves the channels while up-sampling.
    """

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = False, norm: str = "batch") -> None:
        super().__init__()
        self.up: nn.Module
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2, norm=norm)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels, norm=norm)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x1 = self.up(x1)
        # The skip x2 is at most one row/column larger (floor pooling of an odd size): pad the
        # up-sampled tensor on both sides, extra pixel at the end, exactly as the reference.
        diff_y = x2.size(2) - x1.size(2)
        diff_x = x2.size(3) - x1.size(3)
        x1 = F.pad(x1, [diff_x // 2, diff_x - diff_x // 2, diff_y // 2, diff_y - diff_y // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class OutConv(nn.Module):
    """1x1 convolution (with bias) from the last feature map to per-class logits."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Stage(NamedTuple):
    """One feature stage, as policies outside the model see it.

    Attributes:
        name: qualified module name (``model.get_submodule(name)`` returns ``module``); also the
            prefix of its state-dict keys.
        module: the stage module (DoubleConv, Down or Up).
        level: resolution level where its activations live: 0 = input size, 1 = half, ...
    """

    name: str
    module: nn.Module
    level: int


class UNet(nn.Module):
    """U-Net for per-pixel classification of images of any size >= 2**depth per side.

    (With ``norm="instance"`` one side must be >= 2**(depth+1): instance statistics need at
    least two bottleneck pixels.)

    Widths are ``base_width * 2**i`` at level ``i``; with ``bilinear`` the bottleneck and the
    decoder outputs (except the last) are halved, as in the reference. The output has the
    input's height and width for any input size: odd sizes are handled by padding the
    up-sampled maps to the skip connections' sizes.

    Args:
        in_channels: image channels.
        num_classes: output channels (logits per class).
        base_width: channels at full resolution (64 in the reference).
        depth: number of 2x down-samplings (4 in the reference).
        bilinear: bilinear up-sampling instead of transposed convolutions.
        norm: ``batch``, ``group`` or ``instance`` (see :func:`make_norm`).

    Attributes:
        hparams: the constructor arguments; ``UNet(**model.hparams)`` rebuilds the architecture.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 2,
        base_width: int = 64,
        depth: int = 4,
        bilinear: bool = False,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        for key, value in (("in_channels", in_channels), ("num_classes", num_classes),
                           ("base_width", base_width), ("depth", depth)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UNet: {key} must be a positive integer, got {value!r}")
        if norm not in NORMS:
            raise ValueError(f"UNet: unknown norm {norm!r}; expected one of {', '.join(NORMS)}")
        self.hparams: dict[str, Any] = dict(
            in_channels=in_channels, num_classes=num_classes, base_width=base_width,
            depth=depth, bilinear=bool(bilinear), norm=norm,
        )
        self.depth = depth
        factor = 2 if bilinear else 1
        widths = [base_width * 2**i for i in range(depth + 1)]

        self.inc = DoubleConv(in_channels, widths[0], norm=norm)
        self.downs = nn.ModuleList(
            Down(widths[i], widths[i + 1] // (factor if i == depth - 1 else 1), norm=norm) for i in range(depth)
        )
        # ups[j] works at level depth-1-j: concatenated input widths[level+1], output widths[level]
        # (halved with bilinear, except the last, which returns base_width channels).
        self.ups = nn.ModuleList(
            Up(widths[lvl + 1], widths[lvl] // (factor if lvl > 0 else 1), bilinear, norm=norm)
            for lvl in reversed(range(depth))
        )
        self.outc = OutConv(widths[0], num_classes)

    @property
    def min_size(self) -> int:
        """Smallest input height/width: each of the ``depth`` poolings needs at least 2 pixels."""
        return 2**self.depth

    def _check_input(self, x: torch.Tensor) -> None:
        """Fail early, naming the limit, instead of deep inside a pooling or norm layer."""
        if x.dim() != 4 or x.size(2) < self.min_size or x.size(3) < self.min_size:
            raise ValueError(
                f"UNet(depth={self.depth}) expects (N, C, H, W) with H, W >= {self.min_size}; "
                f"got shape {tuple(x.shape)}"
            )
        if self.hparams["norm"] == "instance" and (x.size(2) >> self.depth) * (x.size(3) >> self.depth) < 2:
            # InstanceNorm normalises each map over its own pixels: a 1x1 bottleneck is undefined.
            raise ValueError(
                f"UNet(norm='instance', depth={self.depth}) needs at least 2 bottleneck pixels: "
                f"H or W >= {2 * self.min_size}; got shape {tuple(x.shape)}"
            )

    def stages(self) -> list[Stage]:
        """The feature stages in forward order with their resolution level.

        ``inc`` (level 0), ``downs.i`` (level i+1: it pools, then convolves at the lower
        resolution), ``ups.j`` (level depth-1-j). The head ``outc`` is not listed: it is a single
        1x1 convolution whose only saved activation is its input, so no policy gains by it.
        """
        stages = [Stage("inc", self.inc, 0)]
        stages += [Stage(f"downs.{i}", m, i + 1) for i, m in enumerate(self.downs)]
        stages += [Stage(f"ups.{j}", m, self.depth - 1 - j) for j, m in enumerate(self.ups)]
        return stages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, num_classes, H, W) for an input of shape (N, in_channels, H, W)."""
        self._check_input(x)
        skips: list[torch.Tensor] = []
        x = self.inc(x)
        for down in self.downs:
            skips.append(x)
            x = down(x)
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip)
        return self.outc(x)
