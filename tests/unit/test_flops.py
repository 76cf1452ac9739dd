"""The analytic FLOP count equals FlopCounterMode on the real module, forward and training step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from unetdist import apply_activation_checkpointing
from unetdist.model import UNet
from unetdist.model.flops import (
    forward_flops,
    forward_flops_by_stage,
    forward_flops_per_pixel,
    train_step_flops,
)

# (in_channels, num_classes, base_width, depth, bilinear, height, width, batch)
CASES = [
    (1, 2, 64, 4, False, 256, 256, 2),
    (1, 2, 64, 4, True, 256, 256, 1),
    (3, 2, 64, 4, False, 67, 93, 1),
    (1, 5, 16, 2, False, 33, 17, 3),
    (2, 3, 8, 5, True, 97, 64, 2),
    (1, 1, 32, 1, False, 7, 9, 1),
    (4, 2, 24, 3, True, 128, 41, 1),
]


def _count(case: tuple, *, backward: bool, policy: str = "none") -> FlopCounterMode:
    """FlopCounterMode on the real UNet, on the meta device: exact shapes, no arithmetic done."""
    cin, classes, width, depth, bilinear, h, w, batch = case
    with torch.device("meta"):
        model = UNet(in_channels=cin, num_classes=classes, base_width=width, depth=depth, bilinear=bilinear)
        x = torch.randn(batch, cin, h, w)
        target = torch.randint(0, classes, (batch, h, w))
    apply_activation_checkpointing(model, policy)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = F.cross_entropy(model(x), target)
        if backward:
            loss.backward()
    return counter


def _kwargs(case: tuple) -> dict:
    cin, classes, width, depth, bilinear, *_ = case
    return dict(in_channels=cin, num_classes=classes, base_width=width, depth=depth, bilinear=bilinear)


@pytest.mark.parametrize("case", CASES)
def test_forward_flops_equal_counter(case: tuple) -> None:
    *_, h, w, batch = case
    counter = _count(case, backward=False)
    assert forward_flops(h, w, batch, **_kwargs(case)) == counter.get_total_flops()
    per_module = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    by_stage = forward_flops_by_stage(h, w, batch, **_kwargs(case))
    assert by_stage == {name: per_module[f"UNet.{name}"] for name in by_stage}


@pytest.mark.parametrize("policy", ["none", "highres", "all"])
@pytest.mark.parametrize("case", CASES[::2])
def test_train_step_flops_equal_counter(case: tuple, policy: str) -> None:
    *_, h, w, batch = case
    counted = _count(case, backward=True, policy=policy).get_total_flops()
    assert train_step_flops(h, w, batch, policy=policy, **_kwargs(case)) == counted


def test_meta_device_counts_what_real_tensors_count() -> None:
    """The tests above count on the meta device; on real CPU tensors the count is the same."""
    torch.manual_seed(0)
    model = UNet(in_channels=2, num_classes=3, base_width=8, depth=3, bilinear=False)
    apply_activation_checkpointing(model, "highres")
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(torch.randn(2, 2, 37, 45)), torch.randint(0, 3, (2, 37, 45))).backward()
    case = (2, 3, 8, 3, False, 37, 45, 2)
    assert counter.get_total_flops() == _count(case, backward=True, policy="highres").get_total_flops()


def test_default_model_per_pixel_figures() -> None:
    """The quoted "about 1.468 MFLOP per pixel forward" for the default model, made exact."""
    assert forward_flops_per_pixel() == 1_467_776
    assert forward_flops(512, 512) == 1_467_776 * 512 * 512  # exact for sizes divisible by 16
    assert forward_flops(511, 509) < 1_467_776 * 511 * 509  # floor pooling drops odd rows/columns
    assert forward_flops_per_pixel(bilinear=True) == 1_217_920
    assert forward_flops_per_pixel(in_channels=3) == 1_470_080
    fwd = forward_flops(512, 512, 8)
    first_conv_input_grad = 2 * 1 * 64 * 9 * 512 * 512 * 8  # the image needs no gradient
    assert train_step_flops(512, 512, 8) == 3 * fwd - first_conv_input_grad
    outc = forward_flops_by_stage(512, 512, 8)["outc"]  # the head is never recomputed
    assert train_step_flops(512, 512, 8, policy="all") == 4 * fwd - first_conv_input_grad - outc
    assert 1.33 < train_step_flops(512, 512, 8, policy="all") / train_step_flops(512, 512, 8) < 1.34


def test_explicit_recomputed_stages() -> None:
    by_stage = forward_flops_by_stage(64, 64)
    extra = train_step_flops(64, 64, recomputed_stages={"inc", "ups.3"}) - train_step_flops(64, 64)
    assert extra == by_stage["inc"] + by_stage["ups.3"]
    with pytest.raises(ValueError, match="unknown activation checkpointing policy"):
        train_step_flops(64, 64, policy="most")
