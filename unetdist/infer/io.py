"""Input files as frames the model can take: expanding globs and folders, axes, whole-file reads.

Why this module exists: prediction must know every input's geometry before reading its pixels
(to share the work between ranks) and must map any of TIFF/PNG/npy, 2-D, multi-channel or a
stack of frames onto C x H x W frames and back onto the input's geometry. Reading and the axes
rule are `unetdist.data.inputs`' (`array_header`, `image_axes`, `load_array`, `as_frames`), so
prediction sees a file exactly as `unetdist shard` does. One addition: with automatic axes the
model's channel count settles what the file leaves open: a 1-channel model reads a 3-D array
without TIFF metadata (C x H x W by the rule) as a T x H x W stack, and a C-channel model reads
a plain C-page TIFF (T x H x W by its metadata) as one C-channel image.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unetdist.data.errors import DataError
from unetdist.data.inputs import array_header, as_frames, image_axes, load_array
from unetdist.data.readers import SUFFIXES as INPUT_SUFFIXES  # what open_image reads; .zarr is a folder


@dataclass(frozen=True)
class FrameLayout:
    """How a file's array maps onto frames of C x H x W.

    Attributes:
        shape: the array's shape as stored.
        axes: one letter per stored axis, over T (frames), C (channels), Y, X.
        frames, channels, height, width: sizes (frames and channels are 1 when the axis is absent).
        stack: whether the file has a frame axis (outputs then keep one).
    """

    shape: tuple[int, ...]
    axes: str
    frames: int
    channels: int
    height: int
    width: int

    @property
    def stack(self) -> bool:
        return "T" in self.axes

    @property
    def pixels(self) -> int:
        return self.frames * self.height * self.width


def frame_layout(path: Path, shape: tuple[int, ...], tiff_axes: str | None, in_channels: int,
                 axes: str = "auto") -> FrameLayout:
    """The layout of an array of `shape` for a model taking `in_channels`; DataError names `path` on a mismatch."""
    letters = image_axes(path, tuple(shape), tiff_axes, axes)
    if axes.lower() == "auto":
        sizes = dict(zip(letters, shape))
        if in_channels == 1 and letters == "CYX" and tiff_axes is None:
            letters = "TYX"
        elif in_channels > 1 and letters == "TYX" and sizes["T"] == in_channels:
            letters = "CYX"
    sizes = dict(zip(letters, shape))
    channels = sizes.get("C", 1)
    if channels != in_channels:
        raise DataError(f"{path}: image of shape {tuple(shape)} (axes {letters}) has {channels} channel(s) but the "
                        f"model takes {in_channels}" + ("; give --axes if the axes were misread" if axes == "auto" else ""))
    return FrameLayout(tuple(shape), letters, sizes.get("T", 1), channels, sizes["Y"], sizes["X"])


def probe_layout(path: Path, in_channels: int, axes: str = "auto") -> FrameLayout:
    """A file's layout from its header (pixels are not read)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    shape, dtype, tiff_axes = array_header(path)
    if dtype.kind not in "uifb":
        raise DataError(f"{path}: image dtype {dtype} is not a number type")
    return frame_layout(path, shape, tiff_axes, in_channels, axes)


def read_frames(path: Path, layout: FrameLayout) -> np.ndarray:
    """The file's pixels as T x C x H x W in their stored dtype (a view where possible)."""
    array = load_array(path)
    if tuple(array.shape) != layout.shape:
        raise DataError(f"{path}: has shape {array.shape} now but {layout.shape} when it was probed")
    return as_frames(array, layout.axes)


def expand_inputs(patterns: Iterable[str]) -> list[Path]:
    """Files named or matched by `patterns` (globs are sorted), in order, without repeats."""
    found: list[Path] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no files match {pattern!r}")
        elif os.path.isdir(pattern) and not pattern.rstrip("/").lower().endswith(".zarr"):
            matches = sorted(str(p) for p in Path(pattern).iterdir() if p.suffix.lower() in INPUT_SUFFIXES)
            if not matches:
                raise FileNotFoundError(f"{pattern}: folder holds no {'/'.join(INPUT_SUFFIXES)} images")
        elif os.path.exists(pattern):
            matches = [pattern]
        else:
            raise FileNotFoundError(f"{pattern}: no such file")
        found.extend(Path(m) for m in matches)
    unique = list(dict.fromkeys(found))
    if not unique:
        raise FileNotFoundError("no input files given")
    return unique
