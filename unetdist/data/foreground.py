"""Where the cells or tissue are, from a low-resolution view of an image: skip empty regions cheaply.

Whole slides and tile scans are often mostly background (glass, empty wells). Reading and tiling
those regions costs time, and in training data it dilutes the foreground. A low-resolution view
(the largest pyramid level of at most `max_pixels`, or every k-th pixel of level 0 read band by
band when the file has no pyramid) is thresholded (scikit-image's isodata / Ridler-Calvard rule:
midway between the means of the two classes, so it sits in the middle of an empty gap between glass
and tissue rather than at the edge of the glass's histogram, as Otsu's rule does) and dilated by a
margin, giving a small mask in which any region of the full image can be looked up. A 3 x 3 median
filter first keeps single noisy pixels out.

Polarity: "bright" objects on a dark background (fluorescence), or "dark" ones on a bright
background (brightfield, H&E).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from unetdist.data.readers import ImageSource

MAX_PIXELS = 1 << 20  # about 1024 x 1024: a view that costs little to read and threshold
MARGIN = 2  # low-resolution pixels of dilation, so that object borders are never cut off


@dataclass(frozen=True)
class ForegroundMask:
    """A low-resolution foreground mask and how it maps onto full-resolution pixels."""

    mask: np.ndarray  # bool, low resolution
    scale_y: float  # full-resolution rows per mask row
    scale_x: float
    threshold: float

    def covers(self, y0: int, y1: int, x0: int, x1: int) -> bool:
        """Whether the full-resolution region [y0, y1) x [x0, x1) may hold foreground."""
        rows = slice(int(y0 // self.scale_y), max(int(y0 // self.scale_y) + 1, math.ceil(y1 / self.scale_y)))
        cols = slice(int(x0 // self.scale_x), max(int(x0 // self.scale_x) + 1, math.ceil(x1 / self.scale_x)))
        return bool(self.mask[rows, cols].any())


def _frame_key(source: ImageSource, frame: int, rows: slice, cols: slice) -> tuple[Any, ...]:
    frame_axes = [a for a in source.axes if a not in "CYX"]
    index = dict(zip(frame_axes, np.unravel_index(frame, [source.sizes[a] for a in frame_axes]))) if frame_axes else {}
    return tuple(int(index[a]) if a in index else rows if a == "Y" else cols if a == "X" else slice(None)
                 for a in source.axes)


def low_res_view(source: ImageSource, frame: int = 0, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, float, float]:
    """(2-D float32 view of one frame, channels averaged; full-resolution rows and columns per view pixel)."""
    height, width = source.sizes["Y"], source.sizes["X"]
    sizes = [dict(zip(source.axes, level.shape)) for level in source.levels]
    fitting = [i for i, shape in enumerate(sizes) if shape["Y"] * shape["X"] <= max_pixels]
    if fitting:  # levels get smaller: the first that fits is the most detailed one within max_pixels
        level, shape = source.levels[fitting[0]], sizes[fitting[0]]
        view = np.asarray(level[_frame_key(source, frame, slice(None), slice(None))], np.float32)
        return _channels_mean(view), height / shape["Y"], width / shape["X"]
    step = max(1, math.ceil(math.sqrt(height * width / max_pixels)))
    band = step * max(1, (1 << 22) // (width * step))  # read about 4 M pixels at a time
    parts = [np.asarray(source.array[_frame_key(source, frame, slice(y, min(y + band, height), step),
                                                slice(None, None, step))], np.float32)
             for y in range(0, height, band)]
    return _channels_mean(np.concatenate(parts, axis=-2)), float(step), float(step)


def _channels_mean(view: np.ndarray) -> np.ndarray:
    return view.mean(axis=0) if view.ndim == 3 else view


def foreground_mask(source: ImageSource, frame: int = 0, polarity: str = "bright",
                    max_pixels: int = MAX_PIXELS) -> ForegroundMask:
    """Isodata threshold of the low-resolution view, dilated by MARGIN pixels (see the module docstring)."""
    from scipy import ndimage
    from skimage.filters import threshold_isodata

    if polarity not in ("bright", "dark"):
        raise ValueError(f"polarity must be 'bright' or 'dark', got {polarity!r}")
    view, scale_y, scale_x = low_res_view(source, frame, max_pixels)
    view = ndimage.median_filter(view, size=3)  # single noisy pixels of the background do not count
    if float(view.min()) == float(view.max()):
        return ForegroundMask(np.ones(view.shape, bool), scale_y, scale_x, float(view.min()))
    threshold = float(threshold_isodata(view))
    mask = view > threshold if polarity == "bright" else view < threshold
    mask = ndimage.binary_dilation(mask, iterations=MARGIN)
    return ForegroundMask(mask, scale_y, scale_x, threshold)
