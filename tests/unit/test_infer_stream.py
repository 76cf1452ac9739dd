"""Streaming a frame row block by row block: any band of rows equals the same rows of an unbroken stream, bit
for bit (what resuming and several ranks rely on), and the whole stream equals whole-frame prediction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unetdist.data.manifest import IntensityStats
from unetdist.infer.predict import PredictOptions, SlidingWindowPredictor
from unetdist.infer.stream import stream_logits
from unetdist.model import UNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _cat(blocks: list) -> torch.Tensor:
    return torch.cat([b for _, b in blocks], 1)


def test_bands_and_column_blocks_equal_an_unbroken_stream() -> None:
    torch.manual_seed(0)
    model = UNet(in_channels=1, num_classes=3, base_width=4, depth=2)
    stats = IntensityStats(low=[0.0], high=[3000.0], clipped_mean=[1500.0], clipped_std=[800.0])
    predictor = SlidingWindowPredictor(model, stats, PredictOptions(tile=32, overlap=8), torch.device("cpu"))
    image = np.random.default_rng(0).integers(0, 3000, (1, 150, 170)).astype(np.uint16)
    whole = _cat(list(stream_logits(predictor, image, 0, 150)))
    torch.testing.assert_close(whole, predictor.predict(image), rtol=0, atol=1e-6)
    for y0, y1 in [(37, 90), (0, 13), (140, 150), (64, 128)]:
        blocks = list(stream_logits(predictor, image, y0, y1))
        assert blocks[0][0] == y0 and torch.equal(_cat(blocks), whole[:, y0:y1]), (y0, y1)
    columns = (64, 128)
    unbroken = _cat(list(stream_logits(predictor, image, 0, 150, columns=columns)))
    torch.testing.assert_close(unbroken, whole[:, :, 64:128], rtol=0, atol=1e-6)
    for y0, y1 in [(0, 50), (50, 150), (33, 34)]:
        assert torch.equal(_cat(list(stream_logits(predictor, image, y0, y1, columns=columns))), unbroken[:, y0:y1])
    with pytest.raises(ValueError, match="outside a 150 x 170 frame"):
        next(stream_logits(predictor, image, 0, 151))
