"""The predictor's options: flip TTA, bf16 autocast, bands that add up to the whole frame."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from unetdist.data.manifest import IntensityStats
from unetdist.infer.predict import PredictOptions, SlidingWindowPredictor
from unetdist.model import UNet

STATS = IntensityStats((0.0,), (3000.0,), (1500.0,), (800.0,))


pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _model() -> UNet:
    torch.manual_seed(0)
    model = UNet(in_channels=1, num_classes=3, base_width=4, depth=2)
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model.eval()


def _image(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 3000, (1, height, width)).astype(np.uint16)


def test_flip_tta_makes_the_prediction_flip_equivariant() -> None:
    image = _image(40, 56)  # one window: the flip group average is exactly equivariant
    for tta in (False, True):
        predictor = SlidingWindowPredictor(_model(), STATS, PredictOptions(tile=64, overlap=16, tta=tta), CPU)
        plain = predictor.predict(image)
        flipped = predictor.predict(np.ascontiguousarray(image[..., ::-1])).flip(-1)
        gap = float((plain - flipped).abs().max())
        assert (gap < 1e-4) if tta else (gap > 1e-2), (tta, gap)


def test_bf16_autocast_is_close_to_fp32() -> None:
    image = _image(96, 80)
    logits = {p: SlidingWindowPredictor(_model(), STATS, PredictOptions(tile=64, overlap=16, precision=p), CPU)
              .predict(image) for p in ("fp32", "bf16")}
    assert logits["bf16"].dtype == torch.float32
    scale = float(logits["fp32"].abs().max())
    assert float((logits["bf16"] - logits["fp32"]).abs().max()) < 0.05 * scale
    assert float((logits["bf16"].argmax(0) == logits["fp32"].argmax(0)).float().mean()) > 0.97


def test_bands_add_up_to_the_whole_frame() -> None:
    image = _image(150, 70)
    predictor = SlidingWindowPredictor(_model(), STATS, PredictOptions(tile=32, overlap=8), CPU)
    grid = predictor.grid(150, 70)
    acc, weight = torch.zeros(3, 150, 70), torch.zeros(150, 70)
    for rows in ((0, 2), (2, grid.rows)):
        band = predictor.accumulate(image, rows)
        acc[:, band.y0:band.y1] += band.acc
        weight[band.y0:band.y1] += band.weight
    torch.testing.assert_close(predictor.finalize(acc, weight, 150, 70), predictor.predict(image), atol=1e-5, rtol=0)


def test_invalid_options_are_rejected() -> None:
    for options in (PredictOptions(tile=64, overlap=64), PredictOptions(margin=40), PredictOptions(blend="max"),
                    PredictOptions(precision="fp16"), PredictOptions(batch_size=0)):
        with pytest.raises(ValueError):
            options.validate()
