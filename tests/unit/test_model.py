"""The UNet: reference parameter counts and outputs, any input size, every norm, hparams round-trip."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unetdist.model import UNet
from unetdist.model.flops import level_sizes, stage_levels
from unetdist.model.unet import NORMS, group_count


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({}, 31_036_546), ({"in_channels": 3}, 31_037_698), ({"bilinear": True}, 17_261_890)],
)
def test_default_parameter_counts_match_reference(kwargs: dict, expected: int) -> None:
    assert n_params(UNet(**kwargs)) == expected


class _RefDoubleConv(nn.Module):
    """The seed's DoubleConv (milesial/Pytorch-UNet), written independently of ours."""

    def __init__(self, cin: int, cout: int, mid: int | None = None) -> None:
        super().__init__()
        mid = mid or cout
        self.double_conv = nn.Sequential(
            nn.Conv2d(cin, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class _RefUNet(nn.Module):
    """The seed's UNet with hard-coded widths 64..1024, for an output-level comparison."""

    def __init__(self, n_channels: int, n_classes: int, bilinear: bool) -> None:
        super().__init__()
        f = 2 if bilinear else 1
        self.bilinear = bilinear
        self.inc = _RefDoubleConv(n_channels, 64)
        for k, (cin, cout) in enumerate([(64, 128), (128, 256), (256, 512), (512, 1024 // f)], start=1):
            setattr(self, f"down{k}", nn.Sequential(nn.MaxPool2d(2), _RefDoubleConv(cin, cout)))
        for k, (cin, cout) in enumerate([(1024, 512 // f), (512, 256 // f), (256, 128 // f), (128, 64)], start=1):
            up = nn.Module()
            up.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True) if bilinear else \
                nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
            up.conv = _RefDoubleConv(cin, cout, cin // 2 if bilinear else None)
            setattr(self, f"up{k}", up)
        self.outc = nn.Conv2d(64, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = [self.inc(x)]
        for k in range(1, 5):
            xs.append(getattr(self, f"down{k}")(xs[-1]))
        x = xs.pop()
        for k in range(1, 5):
            up, skip = getattr(self, f"up{k}"), xs.pop()
            x = up.up(x)
            dy, dx = skip.size(2) - x.size(2), skip.size(3) - x.size(3)
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
            x = up.conv(torch.cat([skip, x], dim=1))
        return self.outc(x)


def _to_ours(key: str) -> str:
    """Seed state-dict key -> ours: down3. -> downs.2.maxpool_conv., up1. -> ups.0., outc. -> outc.conv."""
    head, rest = key.split(".", 1)
    if head.startswith("down"):
        return f"downs.{int(head[4:]) - 1}.maxpool_conv.{rest}"
    if head.startswith("up"):
        return f"ups.{int(head[2:]) - 1}.{rest}"
    return f"outc.conv.{rest}" if head == "outc" else key


@pytest.mark.parametrize("bilinear", [False, True])
def test_defaults_reproduce_reference_outputs(bilinear: bool) -> None:
    """Same parameter shapes under a key renaming, and the same logits, on an odd-sized input."""
    torch.manual_seed(0)
    ref = _RefUNet(1, 2, bilinear)
    ours = UNet(bilinear=bilinear)
    mapped = {_to_ours(k): v for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(mapped, strict=True)
    x = torch.randn(1, 1, 35, 19)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("norm", NORMS)
def test_output_size_equals_input_size(norm: str, bilinear: bool, depth: int) -> None:
    model = UNet(in_channels=2, num_classes=3, base_width=4, depth=depth, bilinear=bilinear, norm=norm)
    smallest = 2**depth
    sizes = [(smallest + 1, 2 * smallest + 3), (67, 93), (2 * smallest, smallest)]
    if norm != "instance":  # a 1x1 bottleneck: instance statistics over one pixel are undefined
        sizes.append((smallest, smallest))
    for h, w in sizes:
        y = model(torch.randn(2, 2, h, w))
        assert y.shape == (2, 3, h, w), (h, w)


@pytest.mark.parametrize("depth", [1, 4])
def test_too_small_input_is_a_clear_error(depth: int) -> None:
    model = UNet(base_width=4, depth=depth)
    with pytest.raises(ValueError, match=rf"H, W >= {2**depth}"):
        model(torch.randn(2, 1, 2**depth - 1, 64))
    with pytest.raises(ValueError, match="expects"):
        model(torch.randn(1, 32, 32))
    with pytest.raises(ValueError, match="2 bottleneck pixels"):
        UNet(base_width=4, depth=depth, norm="instance")(torch.randn(2, 1, 2**depth, 2**depth + 1))


def test_odd_base_width_builds_and_runs() -> None:
    for bilinear in (False, True):
        model = UNet(base_width=3, depth=2, bilinear=bilinear, norm="group")
        assert model(torch.randn(2, 1, 9, 11)).shape == (2, 2, 9, 11)


def test_group_and_instance_norm_settings() -> None:
    assert [group_count(c) for c in (64, 128, 12, 6, 3)] == [8, 8, 4, 2, 1]
    for m in UNet(base_width=12, depth=2, norm="group").modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0 and m.num_groups == group_count(m.num_channels)
    norms = [m for m in UNet(base_width=4, depth=2, norm="instance").modules() if isinstance(m, nn.InstanceNorm2d)]
    assert norms and all(m.affine and not m.track_running_stats for m in norms)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"in_channels": 3, "num_classes": 5, "base_width": 8, "depth": 2, "bilinear": True, "norm": "group"},
     {"base_width": 4, "depth": 5, "norm": "instance"}],
)
def test_hparams_round_trip(kwargs: dict) -> None:
    model = UNet(**kwargs)
    assert json.loads(json.dumps(model.hparams)) == model.hparams  # plain values: storable in a checkpoint
    rebuilt = UNet(**model.hparams)
    assert rebuilt.hparams == model.hparams
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("bad", [{"norm": "layer"}, {"depth": 0}, {"base_width": 0}, {"in_channels": 1.5}])
def test_invalid_arguments_rejected(bad: dict) -> None:
    with pytest.raises(ValueError):
        UNet(**bad)


def test_positional_arguments_rejected() -> None:
    with pytest.raises(TypeError):
        UNet(1, 2)  # type: ignore[misc]


@pytest.mark.parametrize("depth", [1, 3])
def test_stages_names_and_levels(depth: int) -> None:
    """Stage names resolve to the modules, and each stage's output lives at its declared level."""
    model = UNet(base_width=4, depth=depth)
    stages = model.stages()
    assert [(s.name, s.level) for s in stages] == stage_levels(depth)
    sizes = level_sizes(37, 45, depth)
    seen: dict[str, tuple[int, int]] = {}
    for s in stages:
        assert model.get_submodule(s.name) is s.module
        s.module.register_forward_hook(lambda m, i, o, name=s.name: seen.__setitem__(name, tuple(o.shape[2:])))
    model(torch.randn(2, 1, 37, 45))
    assert seen == {s.name: sizes[s.level] for s in stages}
