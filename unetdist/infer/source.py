"""Input images as lazily read frames of C x H x W, however their axes are stored.

Why this module exists: prediction must know an input's geometry before reading its pixels (to
share the work between ranks), and then read only the rows it is predicting. An input's axes are
letters over T, C, Z, Y, X in storage order; every combination of the T and Z indices is one 2-D
frame (the model is 2-D), taken in the order T then Z, and outputs keep those axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from unetdist.data.errors import DataError
from unetdist.data.readers import open_image

FRAME_AXES = "TZ"


@dataclass(frozen=True)
class InputImage:
    """An opened input: geometry, pixel size, and a lazily sliced array in `axes` order.

    Attributes:
        path: the file or OME-Zarr folder.
        axes: one letter per stored axis, over T, C, Z, Y, X.
        shape: the stored shape.
        dtype: the stored pixel type.
        pixel_size: {"X": (0.65, "micrometer"), ...}; empty when the file does not say.
        array: numpy-style basic slicing reads only the region asked for.
    """

    path: Path
    axes: str
    shape: tuple[int, ...]
    dtype: np.dtype
    pixel_size: dict[str, tuple[float, str]]
    array: Any = field(repr=False, compare=False)
    closer: Callable[[], None] = field(default=lambda: None, repr=False, compare=False)

    @property
    def sizes(self) -> dict[str, int]:
        return dict(zip(self.axes, self.shape))

    @property
    def frame_axes(self) -> str:
        """The frame letters present, in output order (T before Z)."""
        return "".join(a for a in FRAME_AXES if a in self.axes)

    @property
    def frame_shape(self) -> tuple[int, ...]:
        return tuple(self.sizes[a] for a in self.frame_axes)

    @property
    def frames(self) -> int:
        return int(np.prod(self.frame_shape, dtype=np.int64))

    @property
    def channels(self) -> int:
        return self.sizes.get("C", 1)

    @property
    def height(self) -> int:
        return self.sizes["Y"]

    @property
    def width(self) -> int:
        return self.sizes["X"]

    def frame_index(self, frame: int) -> tuple[int, ...]:
        """Indices over `frame_axes` of frame number `frame` (T-major)."""
        return tuple(int(i) for i in np.unravel_index(frame, self.frame_shape)) if self.frame_axes else ()

    def frame(self, frame: int) -> FrameView:
        """Frame number `frame` as a lazy C x H x W array."""
        return FrameView(self.array, self.axes, dict(zip(self.frame_axes, self.frame_index(frame))))

    def close(self) -> None:
        self.closer()

    def __enter__(self) -> InputImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FrameView:
    """One frame of a stored array seen as C x H x W: `view[:, y0:y1]` reads those rows only."""

    def __init__(self, array: Any, axes: str, index: dict[str, int]) -> None:
        self.array, self.axes, self.index = array, axes, index
        sizes = dict(zip(axes, (int(n) for n in array.shape)))
        self.shape = (sizes.get("C", 1), sizes["Y"], sizes["X"])
        self.dtype = np.dtype(array.dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        wanted = dict(zip("CYX", tuple(key) + (slice(None),) * (3 - len(key))))
        stored = tuple(self.index[a] if a in self.index else wanted[a] for a in self.axes)
        block = np.asarray(self.array[stored])
        kept = [a for a in self.axes if a not in self.index]
        if "C" not in kept:
            block, kept = block[None][wanted["C"]], ["C"] + kept
        return block.transpose([kept.index(a) for a in "CYX"])


def open_input(path: Path, in_channels: int, axes: str = "auto") -> InputImage:
    """Open `path` lazily (`unetdist.data.readers.open_image`); DataError (one line) when it cannot feed the model.

    With automatic axes the model's channel count settles what the file leaves open: a 1-channel
    model takes a channel axis (a 3-D array without metadata reads as C x H x W) as frames, and a
    C-channel model takes a frame axis of exactly C entries as channels (a plain C-page TIFF).
    """
    source = open_image(path, axes)
    letters, sizes = source.axes, source.sizes
    if axes.lower() == "auto" and sizes.get("C", 1) != in_channels:
        if in_channels == 1 and "T" not in letters:
            letters = letters.replace("C", "T")
        elif "C" not in letters and sizes.get("T") == in_channels:
            letters = letters.replace("T", "C")
    image = InputImage(path, letters, source.shape, source.dtype, source.pixel_size, source.array, source.close)
    if image.channels != in_channels:
        image.close()
        raise DataError(f"{path}: image of shape {image.shape} (axes {image.axes}) has {image.channels} channel(s) "
                        f"but the model takes {in_channels}" + ("; give --axes if the axes were misread"
                                                                if axes.lower() == "auto" else ""))
    return image
