"""Tiled prediction equals whole-image prediction: exactly for a shallow model, practically for a deep one.

Exact: a depth-1 U-Net sees about 8 pixels around each output pixel, less than the default
border margin (overlap / 4 = 16 px), and its one 2x2 pooling grid is kept by the window rule, so
the blended tiles of a 700 x 1100 image (tile 256, overlap 64) must equal one whole-image pass to
1e-3 everywhere. The weights are constructed deterministically (seeded Kaiming-normal), so the
logits are O(1) and any misplaced window shows. Deliberately broken window arithmetic (an
off-by-one in the starts, a last window one pixel short) and a margin of 0 must fail the same check.

Practical: the default depth-4 architecture (narrow: width 8) trained briefly (25 seeded Adam
steps on synthetic nuclei, 1 thread) sees far more than the margin, so only the label maps are
compared: they agree on >= 99% of the pixels, and the Gaussian blend beats plain averaging.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

import unetdist.infer.windows as windows
from unetdist.data.manifest import IntensityStats, normalize
from unetdist.data.synth import synth_image
from unetdist.infer.predict import PredictOptions, SlidingWindowPredictor
from unetdist.model import UNet

TOLERANCE = 1e-3
_correct_starts = windows.window_starts


def _kaiming_unet(depth: int, width: int, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(in_channels=1, num_classes=2, base_width=width, depth=depth)
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exact_case() -> tuple[UNet, IntensityStats, np.ndarray, torch.Tensor]:
    model = _kaiming_unet(depth=1, width=4)
    image, _ = synth_image(3, 0, 700, 1100)
    stats = IntensityStats((400.0,), (4000.0,), (900.0,), (600.0,))
    with torch.inference_mode():
        whole = model(torch.from_numpy(normalize(image[None], stats))[None])[0]
    return model, stats, image[None], whole


def _interior_start_plus_one(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    starts = _correct_starts(length, tile, overlap, align)
    return starts[:1] + [s + 1 for s in starts[1:-1]] + starts[-1:] if len(starts) > 2 else starts


def _last_window_one_short(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    starts = _correct_starts(length, tile, overlap, align)
    return starts[:-1] + [starts[-1] - 1] if len(starts) > 1 else starts


def _tiled_error(exact_case: tuple, margin: int | None = None) -> float:
    model, stats, image, whole = exact_case
    predictor = SlidingWindowPredictor(model, stats, PredictOptions(tile=256, overlap=64, margin=margin),
                                       torch.device("cpu"))
    try:
        tiled = predictor.predict(image)
    except RuntimeError:  # uncovered pixels are caught inside the predictor
        return float("inf")
    assert tiled.shape == whole.shape
    return float((tiled - whole).abs().max())


def test_tiled_equals_whole_image_exactly(exact_case: tuple) -> None:
    logits = exact_case[3]
    assert float(logits.max() - logits.min()) > 2, "logits span units, so a misplaced window shows"
    error = _tiled_error(exact_case)
    assert error <= TOLERANCE, f"max |tiled - whole| = {error}"


@pytest.mark.parametrize("broken", [_interior_start_plus_one, _last_window_one_short], ids=lambda f: f.__name__[1:])
def test_off_by_one_in_window_arithmetic_fails_the_check(exact_case: tuple, broken: Callable,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(windows, "window_starts", broken)
    error = _tiled_error(exact_case)
    assert error > TOLERANCE, f"the broken arithmetic went unnoticed: max |tiled - whole| = {error}"


def test_border_margin_is_needed(exact_case: tuple) -> None:
    """Without discarding window borders, zero-padded window edges leak into the blend."""
    error = _tiled_error(exact_case, margin=0)
    assert error > TOLERANCE, f"max |tiled - whole| = {error}"


def _train_briefly(steps: int = 25) -> tuple[UNet, IntensityStats]:
    torch.manual_seed(0)
    pairs = [synth_image(0, i, 128, 128) for i in range(4)]
    raw = np.stack([image for image, _ in pairs]).astype(np.float64)
    low, high = np.percentile(raw, [0.5, 99.5])
    clipped = np.clip(raw, low, high)
    stats = IntensityStats((low,), (high,), (clipped.mean(),), (clipped.std(),))
    x = torch.from_numpy(normalize(raw[:, None], stats))
    y = torch.from_numpy(np.stack([(inst > 0).astype(np.int64) for _, inst in pairs]))
    model = UNet(in_channels=1, num_classes=2, base_width=8, depth=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        index, (oy, ox) = rng.integers(0, 4, 4), rng.integers(0, 64, 2)
        loss = torch.nn.functional.cross_entropy(model(x[index, :, oy:oy + 64, ox:ox + 64]), y[index, oy:oy + 64, ox:ox + 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), stats


def test_deep_model_tiles_agree_practically_and_gaussian_beats_averaging() -> None:
    model, stats = _train_briefly()
    image, instances = synth_image(1, 0, 384, 640)
    with torch.inference_mode():
        whole = model(torch.from_numpy(normalize(image[None], stats))[None])[0].argmax(0)
    assert 0.02 < float((whole == 1).float().mean()) < 0.6, "the model segments something"
    disagree = {}
    for blend in ("gaussian", "constant"):
        options = PredictOptions(tile=128, overlap=32, blend=blend, batch_size=8)  # default margin: 8 px
        tiled = SlidingWindowPredictor(model, stats, options, torch.device("cpu")).predict(image[None]).argmax(0)
        disagree[blend] = int((tiled != whole).sum())
    assert disagree["gaussian"] <= 0.01 * whole.numel(), disagree
    assert disagree["gaussian"] < disagree["constant"], disagree
