"""Sliding-window placement and blending weights for whole-image prediction (pure numpy).

Why this module exists: tiled prediction is seamless only if every window is placed, weighted
and pasted back by one rule, and that rule must be testable without a model.

Why not `unetdist.data.tiling`: training tiles are all full-sized and may run into reflect
padding past the bottom/right edge. For prediction that padding would make border pixels differ
from a whole-image pass (the network zero-pads at the image border). So here:

- Windows are `tile` pixels (or the whole axis when it is shorter), the first flush with the
  top/left edge and the last flush with the bottom/right edge, never past it.
- Starts between them are spread evenly and snapped to multiples of `align` (2**depth for a
  U-Net: its max-pooling grid), so a window pools the same 2x2 blocks as the whole image does.
- Every pair of neighbouring windows overlaps by at least `overlap` pixels.

Blending (nnU-Net style): each window's logits are weighted by a Gaussian importance map with
sigma = window size / 8 (peak 1 at the centre), and the outermost `margin` pixels are given
weight 0 where the window edge lies inside the image, because there the network saw zero padding
instead of the image's content. With `2 * margin <= overlap` every pixel keeps a positive weight
from at least one window. The prediction is sum(weight * logits) / sum(weight).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

BLENDS: tuple[str, ...] = ("gaussian", "constant")
SIGMA_SCALE = 1.0 / 8.0  # nnU-Net's default: sigma = tile / 8


def check_tiling(tile: int, overlap: int, margin: int) -> None:
    """Raise ValueError unless tile >= 1, 0 <= overlap < tile and 0 <= 2 * margin <= overlap."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile={tile}), got {overlap}")
    if margin < 0 or 2 * margin > overlap:
        raise ValueError(f"margin must be in [0, overlap/2={overlap // 2}] so that every pixel keeps a "
                         f"window that does not discard it, got {margin}")


def default_margin(overlap: int) -> int:
    """Border pixels discarded at a window's inner edges: a quarter of the overlap.

    Half the overlap is then left for the Gaussian blend; a quarter of the default overlap of
    64 (16 px) covers the receptive field of shallow models exactly and of deep ones mostly.
    """
    return overlap // 4


def window_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of the windows along an axis of `length` pixels (see the module rules).

    The fewest windows are used whose neighbours overlap by at least `overlap` once interior
    starts are rounded to multiples of `align`; when `tile - overlap < 2 * align` rounding could not
    keep that promise and starts are only rounded to whole pixels.
    """
    if length < 1:
        raise ValueError(f"cannot place windows on an axis of length {length}")
    check_tiling(tile, overlap, 0)
    if length <= tile:
        return [0]
    span, stride = length - tile, tile - overlap
    if stride < 2 * align:
        align = 1
    for count in range(math.ceil(span / stride) + 1, span + 2):
        starts = [align * round(i * span / ((count - 1) * align)) for i in range(count - 1)] + [span]
        if all(0 < b - a <= stride for a, b in zip(starts, starts[1:])):
            return starts
    return window_starts(length, tile, overlap, 1)  # unreachable for align=1: count = span + 1 steps by 1


@dataclass(frozen=True)
class Window:
    """One window: top-left corner and size, in image pixels."""

    y: int
    x: int
    h: int
    w: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y, self.y + self.h), slice(self.x, self.x + self.w)


@dataclass(frozen=True)
class WindowGrid:
    """The windows of one image: rows of windows sharing a start `y`, all of one size."""

    height: int
    width: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    h: int
    w: int

    @property
    def rows(self) -> int:
        return len(self.ys)

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def windows(self, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> list[Window]:
        """Windows of window rows [lo, hi) and window columns `cols` (all by default), row by row."""
        lo, hi = rows if rows is not None else (0, self.rows)
        left, right = cols if cols is not None else (0, len(self.xs))
        return [Window(y, x, self.h, self.w) for y in self.ys[lo:hi] for x in self.xs[left:right]]

    def columns(self, cols: tuple[int, int]) -> tuple[int, int]:
        """Image columns [x0, x1) that window columns [lo, hi) cover."""
        lo, hi = cols
        if not 0 <= lo < hi <= len(self.xs):
            raise ValueError(f"window columns {cols} outside [0, {len(self.xs)})")
        return self.xs[lo], self.xs[hi - 1] + self.w

    def band(self, rows: tuple[int, int]) -> tuple[int, int]:
        """Image rows [y0, y1) that window rows [lo, hi) cover."""
        lo, hi = rows
        if not 0 <= lo < hi <= self.rows:
            raise ValueError(f"window rows {rows} outside [0, {self.rows})")
        return self.ys[lo], self.ys[hi - 1] + self.h


def touching(starts: tuple[int, ...], size: int, a: int, b: int) -> tuple[int, int]:
    """Indices [lo, hi) of the windows (at `starts`, `size` long) that overlap pixels [a, b) of their axis."""
    lo = next(i for i, s in enumerate(starts) if s + size > a)
    hi = max(i for i, s in enumerate(starts) if s < b) + 1
    return lo, hi


def window_grid(height: int, width: int, tile: int, overlap: int, align: int = 1) -> WindowGrid:
    """All windows of a `height` x `width` image."""
    return WindowGrid(height, width, tuple(window_starts(height, tile, overlap, align)),
                      tuple(window_starts(width, tile, overlap, align)), min(tile, height), min(tile, width))


def split_rows(rows: int, parts: int) -> list[tuple[int, int]]:
    """Split window rows [0, rows) into at most `parts` contiguous, non-empty, near-equal ranges."""
    parts = max(1, min(parts, rows))
    bounds = [round(i * rows / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:])]


def gaussian_map(h: int, w: int, sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
    """float32 h x w importance map: separable Gaussian, sigma = size * `sigma_scale`, maximum 1."""
    axes = []
    for n in (h, w):
        offsets = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        sigma = max(n * sigma_scale, 1e-3)
        axes.append(np.exp(-(offsets**2) / (2.0 * sigma**2)))
    out = np.outer(axes[0], axes[1])
    return (out / out.max()).astype(np.float32)


def inner_edges(window: Window, height: int, width: int) -> tuple[bool, bool, bool, bool]:
    """Which edges of `window` (top, bottom, left, right) lie inside a `height` x `width` image."""
    return window.y > 0, window.y + window.h < height, window.x > 0, window.x + window.w < width


@lru_cache(maxsize=64)
def edge_weight(h: int, w: int, blend: str, margin: int, inner: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """Blending weight (read-only float32 h x w) of a window whose `inner` edges lose `margin` pixels."""
    if blend == "gaussian":
        weight = gaussian_map(h, w)
    elif blend == "constant":
        weight = np.ones((h, w), np.float32)
    else:
        raise ValueError(f"unknown blend {blend!r}; expected one of {', '.join(BLENDS)}")
    if margin:
        top, bottom, left, right = inner
        if top:
            weight[:margin] = 0
        if bottom:
            weight[h - margin:] = 0
        if left:
            weight[:, :margin] = 0
        if right:
            weight[:, w - margin:] = 0
    weight.setflags(write=False)
    return weight


def window_weight(window: Window, height: int, width: int, blend: str, margin: int) -> np.ndarray:
    """Blending weight of `window` (read-only float32 h x w): zero `margin` px at its inner edges."""
    return edge_weight(window.h, window.w, blend, margin, inner_edges(window, height, width))
