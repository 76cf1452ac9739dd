"""Blended logits of a frame, row block by row block, holding only one window row's worth of sums.

Why this module exists: a whole-slide frame's logits (classes x 50,000 x 50,000 float32) do not fit
in memory, and neither does the frame. Windows are predicted one window row at a time
(`SlidingWindowPredictor.accumulate` reads only that row's band of the input); once window row i
is done, no later window touches the image rows above window row i + 1, so those rows are final
and leave as a block. Only the strip where window rows overlap is carried to the next one. A
stream may also cover only the columns [x0, x1) of the frame: then only the windows touching
them are predicted, and memory no longer grows with the frame's width.

The sums of every pixel are formed in the same order (window rows top to bottom, windows left to
right, then the carried strip added) whether the stream starts at the top or at some row `y0`, so
a region predicted by another rank or after a restart is bit-identical to the same region of an
unbroken stream over the same columns. (Streams over other columns batch other windows together,
which may change the last bit of a convolution: 1e-7 of a logit.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from unetdist.infer.predict import SlidingWindowPredictor
from unetdist.infer.windows import touching


def stream_logits(predictor: SlidingWindowPredictor, frame: Any, y0: int, y1: int,
                  progress: Callable[[int], None] | None = None,
                  columns: tuple[int, int] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first row, K x rows x (x1 - x0) float32 logits) blocks covering rows [y0, y1), in order.

    `frame` is anything sliced like a C x H x W array (`frame[:, a:b, c:d]` reads that region only);
    `columns` is the column range [x0, x1) (default: the whole width).
    """
    height, width = (int(n) for n in frame.shape[-2:])
    x0, x1 = columns or (0, width)
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise ValueError(f"rows [{y0}, {y1}) x columns [{x0}, {x1}) outside a {height} x {width} frame")
    grid = predictor.grid(height, width)
    lo, hi = touching(grid.ys, grid.h, y0, y1)
    cols = touching(grid.xs, grid.w, x0, x1)
    carry: tuple[torch.Tensor, torch.Tensor] | None = None
    for i in range(lo, hi):
        band = predictor.accumulate(frame, (i, i + 1), progress, cols)
        acc, weight = band.acc, band.weight
        if carry is not None:
            n = carry[1].shape[0]
            acc[:, :n] += carry[0]
            weight[:n] += carry[1]
        done = (grid.ys[i + 1] if i + 1 < grid.rows else grid.height) - band.y0
        carry = (acc[:, done:].clone(), weight[done:].clone()) if done < acc.shape[1] else None
        start, stop = max(band.y0, y0), min(band.y0 + done, y1, height)
        if start < stop:
            a, b, c, d = start - band.y0, stop - band.y0, x0 - band.x0, x1 - band.x0
            yield start, predictor.finalize(acc[:, a:b, c:d], weight[a:b, c:d], b - a, d - c)
