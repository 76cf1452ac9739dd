"""Frames and row bands of lazily opened images: what shard writing reads, one region at a time.

An image file is seen as frames x channels x H x W: every axis other than C, Y and X (T and Z,
in storage order) indexes 2-D frames, so a z-stack gives its slices as 2-D samples and a 5-D TCZYX
file T x Z frames. A label file gives one H x W class or instance mask per frame: all its axes
other than Y and X index frames (a size-1 channel axis counts as nothing).

Reads go through `readers.open_image`, so only the rows asked for are decoded; files stay open per
process (a small cache), since consecutive bands of one frame come from the same file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unetdist.data.errors import DataError
from unetdist.data.readers import AxesError, AxesView, ImageSource, expand_key, open_image


@dataclass(frozen=True)
class Layout:
    """How an opened file maps onto frames x channels x height x width."""

    axes: str
    frame_axes: str  # the axes that index frames, e.g. "TZ" ("" for a single frame)
    frame_shape: tuple[int, ...]
    channels: int
    height: int
    width: int
    dtype: str
    pixel_size: dict[str, tuple[float, str]]
    kind: str = "image"  # or "label"

    @property
    def frames(self) -> int:
        return math.prod(self.frame_shape)


_OPEN: dict[tuple[Path, str, int, int], ImageSource] = {}  # files kept open between bands, oldest first
KEEP_OPEN = 4


def source(path: Path, axes: str = "auto") -> ImageSource:
    """The opened file, kept open for the next band (re-opened when the file changed)."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    key = (path, axes, stat.st_mtime_ns, stat.st_size)
    if key not in _OPEN:
        opened = open_image(path, axes)
        while len(_OPEN) >= KEEP_OPEN:
            _OPEN.pop(next(iter(_OPEN))).close()
        _OPEN[key] = opened
    return _OPEN[key]


def close_all() -> None:
    """Close the files kept open.

    Also run first thing in forked worker processes: a file offset shared with the parent (or a
    sibling) must never be moved by two processes at once.
    """
    while _OPEN:
        _OPEN.popitem()[1].close()


def label_source(path: Path) -> ImageSource:
    """A label file; all its non-spatial axes index frames, so unnamed ones (Q, I, ...) need no --axes."""
    try:
        return source(path)
    except AxesError as exc:
        if not 3 <= len(exc.shape) <= 5:
            raise
        return source(path, "TZC"[: len(exc.shape) - 2] + "YX")


def image_layout(image: ImageSource) -> Layout:
    """Frames (T, Z, ...), channels and size of an image."""
    sizes = image.sizes
    frame_axes = "".join(a for a in image.axes if a not in "CYX")
    if image.dtype.kind not in "uif":
        raise DataError(f"{image.path}: image dtype {image.dtype} is not a number type")
    return Layout(image.axes, frame_axes, tuple(sizes[a] for a in frame_axes), sizes.get("C", 1), sizes["Y"],
                  sizes["X"], str(image.dtype), dict(image.pixel_size))


def label_layout(label: ImageSource, image: Layout, image_path: Path) -> Layout:
    """A label file's layout, checked against its image's frames and size (error names both files)."""
    frame_axes = "".join(a for a in label.axes if a not in "YX" and label.sizes[a] > 1)
    shape = tuple(label.sizes[a] for a in frame_axes)
    sizes = label.sizes
    if (math.prod(shape), sizes["Y"], sizes["X"]) != (image.frames, image.height, image.width):
        frames = image.frames
        raise DataError(f"{image_path} is {frames} frame(s) of {image.height}x{image.width} (H x W) but its label "
                        f"{label.path} is {'x'.join(map(str, label.shape))}; expected {'T x ' if frames > 1 else ''}"
                        "H x W")
    if label.dtype.kind not in "uifb":
        raise DataError(f"{label.path}: label dtype {label.dtype} is not an integer type")
    return Layout(label.axes, frame_axes, shape, 1, sizes["Y"], sizes["X"], str(label.dtype), {}, "label")


def check_label_rows(rows: np.ndarray, path: Path) -> np.ndarray:
    """Label rows as they are, or an error when a float label holds non-integer values (never rounded)."""
    if rows.dtype.kind == "f" and not np.all(np.mod(rows, 1) == 0):
        raise DataError(f"{path}: label holds non-integer values; labels must be class indices or instance ids")
    return rows


def frame_view(image: ImageSource, layout: Layout, frame: int) -> Any:
    """One frame of an image as a lazy C x H x W array (only what is sliced is read), e.g. for
    sampling its intensity percentiles without reading it whole."""
    index = dict(zip(layout.frame_axes, np.unravel_index(frame, layout.frame_shape))) if layout.frame_axes else {}
    axes = "CYX" if "C" in image.axes else "YX"
    view = AxesView(image.array, image.axes, axes, {a: int(i) for a, i in index.items()})
    return view if axes == "CYX" else _Expanded(view)


class _Expanded:
    """A YX array seen with a leading channel axis of size 1."""

    def __init__(self, base: Any) -> None:
        self.base, self.shape, self.dtype, self.ndim = base, (1, *base.shape), base.dtype, 3

    def __getitem__(self, key: Any) -> np.ndarray:
        parts = expand_key(key, 3)
        region = np.asarray(self.base[tuple(parts[1:])])
        return region if isinstance(parts[0], int) else region[None][parts[0]]


def read_rows(image: ImageSource, layout: Layout, frame: int, top: int, bottom: int) -> np.ndarray:
    """Rows [top, bottom) of one frame: C x rows x W for an image layout, rows x W for a label layout."""
    index = dict(zip(layout.frame_axes, np.unravel_index(frame, layout.frame_shape))) if layout.frame_axes else {}
    channels = slice(None) if layout.kind == "image" else 0
    key = tuple(int(index[a]) if a in index else slice(top, bottom) if a == "Y" else slice(None) if a == "X"
                else channels if a == "C" else 0 for a in image.axes)
    try:
        region = np.asarray(image.array[key])
    except Exception as exc:  # codecs raise their own types on damaged data; name the file
        raise DataError(f"cannot read {image.path} (frame {frame}, rows {top}-{bottom}): "
                        f"{type(exc).__name__}: {exc}") from exc
    return region[None] if layout.kind == "image" and region.ndim == 2 else region
