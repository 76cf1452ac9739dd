"""Blended logits of a frame, row block by row block, holding only one window row's worth of sums.

Why this module exists: a whole-slide frame's logits (classes x 50,000 x 50,000 float32) do not fit
in memory, and neither does the frame. Windows are predicted one window row at a time
(`SlidingWindowPredictor.accumulate` reads only that row's band of the input); once window row i
is done, no later window touches the image rows above window row i + 1, so those rows are final
and leave as a block. Only the strip where window rows overlap is carried to the next one.

The sums of every pixel are formed in the same order (window rows top to bottom, windows left to
right, then the carried strip added) whether the stream starts at the top or at some row `y0`, so
a region predicted alone, by another rank, or after a restart is bit-identical to the same region
of a whole-frame pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from unetdist.infer.predict import SlidingWindowPredictor


def window_rows_for(predictor: SlidingWindowPredictor, height: int, width: int, y0: int, y1: int) -> tuple[int, int]:
    """Window rows [lo, hi) whose windows touch image rows [y0, y1)."""
    grid = predictor.grid(height, width)
    lo = next(i for i, y in enumerate(grid.ys) if y + grid.h > y0)
    hi = max(i for i, y in enumerate(grid.ys) if y < y1) + 1
    return lo, hi


def stream_logits(predictor: SlidingWindowPredictor, frame: Any, y0: int, y1: int,
                  progress: Callable[[int], None] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first row, K x rows x W float32 logits) blocks covering image rows [y0, y1) of a frame, in order.

    `frame` is anything sliced like a C x H x W array (`frame[:, a:b]` reads rows a..b only).
    """
    height, width = (int(n) for n in frame.shape[-2:])
    if not 0 <= y0 < y1 <= height:
        raise ValueError(f"rows [{y0}, {y1}) outside a frame of height {height}")
    grid = predictor.grid(height, width)
    lo, hi = window_rows_for(predictor, height, width, y0, y1)
    carry: tuple[torch.Tensor, torch.Tensor] | None = None
    for i in range(lo, hi):
        band = predictor.accumulate(frame, (i, i + 1), progress)
        acc, weight = band.acc, band.weight
        if carry is not None:
            n = carry[1].shape[0]
            acc[:, :n] += carry[0]
            weight[:n] += carry[1]
        done = (grid.ys[i + 1] if i + 1 < grid.rows else grid.height) - band.y0
        carry = (acc[:, done:].clone(), weight[done:].clone()) if done < acc.shape[1] else None
        start, stop = max(band.y0, y0), min(band.y0 + done, y1, height)
        if start < stop:
            a, b = start - band.y0, stop - band.y0
            yield start, predictor.finalize(acc[:, a:b], weight[a:b], b - a, width)
