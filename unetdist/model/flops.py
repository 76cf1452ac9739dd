"""Analytic FLOPs of the UNet, for throughput figures and model-FLOP utilisation (MFU).

Why this module exists: MFU needs the FLOPs of a step without running a counter every step, and
the counter (``torch.utils.flop_counter.FlopCounterMode``) is the reference the figures must
agree with. The convention is therefore the counter's:

* a convolution or transposed convolution costs 2 x MACs = ``2 * C_in * C_out * kH * kW`` per
  position, counted on the *output* positions for a convolution and on the *input* positions
  for a transposed one; biases are not counted;
* normalisation, ReLU, max-pooling, padding, concatenation, bilinear up-sampling and the loss
  are not counted (they are memory-bound and a few percent of the arithmetic at most);
* backward costs 2x forward per convolution (input gradient + weight gradient), except the first
  convolution, whose input (the image) needs no gradient: weight gradient only;
* activation checkpointing adds one more forward of every checkpointed stage (recomputation).

For the default model (1 input channel, 2 classes, width 64, depth 4, transposed convolutions)
the forward pass costs 1,467,776 FLOP per pixel, exactly for every size divisible by 16 (the
"about 1.468 MFLOP per pixel" quoted for this model is right). A training step is then 3x that (minus the first
convolution's input gradient, 1,152 FLOP per pixel) and 4x with every stage checkpointed, less
the head ``outc`` that is never recomputed: 1.333x the plain step.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

from unetdist.model.stages import select_stages


class ConvLayer(NamedTuple):
    """One (transposed) convolution of the UNet, as the FLOP count sees it.

    Attributes:
        stage: name of the stage that holds it (``inc``, ``downs.i``, ``ups.j``, ``outc``).
        c_in: input channels.
        c_out: output channels.
        kernel_area: kH * kW.
        level: resolution level whose positions are counted (output level for a convolution,
            input level for a transposed convolution); level 0 is the input size.
    """

    stage: str
    c_in: int
    c_out: int
    kernel_area: int
    level: int


def conv_layers(
    in_channels: int = 1, num_classes: int = 2, base_width: int = 64, depth: int = 4, bilinear: bool = False
) -> list[ConvLayer]:
    """Every convolution of ``UNet(...)`` with these arguments, in forward order.

    Written from the architecture's arithmetic, not read off a module, so that a test comparing
    it with ``FlopCounterMode`` on the real module checks both.
    """
    factor = 2 if bilinear else 1
    widths = [base_width * 2**i for i in range(depth + 1)]

    def double(stage: str, c_in: int, c_mid: int, c_out: int, level: int) -> list[ConvLayer]:
        return [ConvLayer(stage, c_in, c_mid, 9, level), ConvLayer(stage, c_mid, c_out, 9, level)]

    layers = double("inc", in_channels, widths[0], widths[0], 0)
    for i in range(depth):
        c_out = widths[i + 1] // (factor if i == depth - 1 else 1)
        layers += double(f"downs.{i}", widths[i], c_out, c_out, i + 1)
    for j, lvl in enumerate(reversed(range(depth))):
        c_in = widths[lvl + 1]  # channels after concatenating the skip
        c_out = widths[lvl] // (factor if lvl > 0 else 1)
        if bilinear:
            layers += double(f"ups.{j}", c_in, c_in // 2, c_out, lvl)
        else:
            layers.append(ConvLayer(f"ups.{j}", c_in, c_in // 2, 4, lvl + 1))
            layers += double(f"ups.{j}", c_in, c_out, c_out, lvl)
    layers.append(ConvLayer("outc", widths[0], num_classes, 1, 0))
    return layers


def level_sizes(height: int, width: int, depth: int) -> list[tuple[int, int]]:
    """(H, W) at each level 0..depth: floor halving, as ``MaxPool2d(2)`` does."""
    sizes = [(height, width)]
    for _ in range(depth):
        h, w = sizes[-1]
        sizes.append((h // 2, w // 2))
    return sizes


def _layer_flops(layer: ConvLayer, sizes: list[tuple[int, int]]) -> int:
    h, w = sizes[layer.level]
    return 2 * layer.c_in * layer.c_out * layer.kernel_area * h * w


def forward_flops(
    height: int,
    width: int,
    batch: int = 1,
    *,
    in_channels: int = 1,
    num_classes: int = 2,
    base_width: int = 64,
    depth: int = 4,
    bilinear: bool = False,
) -> int:
    """Exact forward FLOPs for a batch of ``batch`` images of ``height`` x ``width``."""
    by_stage = forward_flops_by_stage(
        height, width, batch, in_channels=in_channels, num_classes=num_classes,
        base_width=base_width, depth=depth, bilinear=bilinear,
    )
    return sum(by_stage.values())


def forward_flops_by_stage(
    height: int,
    width: int,
    batch: int = 1,
    *,
    in_channels: int = 1,
    num_classes: int = 2,
    base_width: int = 64,
    depth: int = 4,
    bilinear: bool = False,
) -> dict[str, int]:
    """Exact forward FLOPs per stage (``inc``, ``downs.i``, ``ups.j``, ``outc``), in forward order.

    Shows where the arithmetic is (and what a checkpointing policy recomputes).
    """
    sizes = level_sizes(height, width, depth)
    by_stage: dict[str, int] = {}
    for layer in conv_layers(in_channels, num_classes, base_width, depth, bilinear):
        by_stage[layer.stage] = by_stage.get(layer.stage, 0) + batch * _layer_flops(layer, sizes)
    return by_stage


def forward_flops_per_pixel(
    in_channels: int = 1, num_classes: int = 2, base_width: int = 64, depth: int = 4, bilinear: bool = False
) -> float:
    """Forward FLOPs per input pixel for large tiles (level ``l`` has ``4**-l`` of the pixels).

    Exact for every size divisible by ``2**depth``; other sizes have slightly fewer FLOPs per
    pixel (floor pooling drops the odd rows and columns), see :func:`forward_flops`.
    """
    layers = conv_layers(in_channels, num_classes, base_width, depth, bilinear)
    return sum(2 * lyr.c_in * lyr.c_out * lyr.kernel_area / 4**lyr.level for lyr in layers)


def train_step_flops(
    height: int,
    width: int,
    batch: int = 1,
    *,
    in_channels: int = 1,
    num_classes: int = 2,
    base_width: int = 64,
    depth: int = 4,
    bilinear: bool = False,
    policy: str = "none",
    recomputed_stages: Collection[str] | None = None,
) -> int:
    """Exact FLOPs of one training step (forward + backward, with recomputation).

    Args:
        height, width, batch: input tile size and batch.
        in_channels, num_classes, base_width, depth, bilinear: the model, as for ``UNet``.
        policy: activation checkpointing policy (``none``, ``highres``, ``all``); its stages are
            recomputed once during backward.
        recomputed_stages: explicit stage names to count as recomputed instead of ``policy``.

    Returns:
        Forward + 2x forward for backward (minus the first convolution's input gradient) +
        the forward FLOPs of the recomputed stages; the optimiser step is not counted.
    """
    sizes = level_sizes(height, width, depth)
    layers = conv_layers(in_channels, num_classes, base_width, depth, bilinear)
    if recomputed_stages is None:
        recomputed_stages = select_stages([(s, None, lvl) for s, lvl in stage_levels(depth)], policy)
    total = 0
    for index, layer in enumerate(layers):
        flops = _layer_flops(layer, sizes)
        backward = flops if index == 0 else 2 * flops
        total += flops + backward + (flops if layer.stage in recomputed_stages else 0)
    return batch * total


def stage_levels(depth: int) -> list[tuple[str, int]]:
    """Stage names and resolution levels, as ``UNet.stages()`` lists them."""
    return (
        [("inc", 0)]
        + [(f"downs.{i}", i + 1) for i in range(depth)]
        + [(f"ups.{j}", depth - 1 - j) for j in range(depth)]
    )


FLOP_HPARAMS: tuple[str, ...] = ("in_channels", "num_classes", "base_width", "depth", "bilinear")


def train_step_flops_for(model: Mapping[str, Any], height: int, width: int, batch: int, policy: str = "none") -> int:
    """:func:`train_step_flops` for a model given by its hyper-parameters.

    Args:
        model: ``cfg.model.hparams()`` or ``UNet.hparams``; keys the count does not
            depend on (``norm``: normalisation is not counted) are ignored.
        height, width, batch: the per-device batch of one optimizer step (with gradient
            accumulation, the micro-batches together: the count is linear in the batch).
        policy: ``train.activation_checkpointing``.
    """
    return train_step_flops(height, width, batch, policy=policy, **{k: model[k] for k in FLOP_HPARAMS if k in model})
