"""Input images as lazily read frames of C x H x W, however their axes are stored.

Why this module exists: prediction must know an input's geometry before reading its pixels (to
share the work between ranks), and then read only the rows it is predicting. An input's axes are
letters over T, C, Z, Y, X in storage order; every combination of the T and Z indices is one 2-D
frame (the model is 2-D), taken in the order T then Z, and outputs keep those axes.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tifffile

from unetdist.data.errors import DataError
from unetdist.data.inputs import load_array
from unetdist.infer.io import frame_layout

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
    """Open `path` lazily; DataError (one line, naming the file) when it cannot feed the model."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        image = _open_zarr(path)
    elif path.suffix.lower() in (".tif", ".tiff"):
        image = _open_tiff(path, in_channels, axes)
    else:
        array = load_array(path)
        layout = frame_layout(path, tuple(array.shape), None, in_channels, axes)
        image = InputImage(path, layout.axes, tuple(array.shape), array.dtype, {}, array)
    if image.dtype.kind not in "uifb":
        image.close()
        raise DataError(f"{path}: image dtype {image.dtype} is not a number type")
    if image.channels != in_channels:
        image.close()
        raise DataError(f"{path}: image of shape {image.shape} (axes {image.axes}) has {image.channels} channel(s) "
                        f"but the model takes {in_channels}; give --axes if the axes were misread")
    return image


def _open_tiff(path: Path, in_channels: int, axes: str) -> InputImage:
    import zarr

    try:
        tif = tifffile.TiffFile(path)
        series = tif.series[0]
        array = zarr.open(series.aszarr(), mode="r")
    except Exception as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    layout = frame_layout(path, tuple(series.shape), str(series.axes), in_channels, axes)
    letters = layout.axes
    if axes == "auto" and len(letters) == len(series.axes):  # keep Z (a z-stack) apart from T (time)
        letters = "".join("Z" if a == "T" and b == "Z" else a for a, b in zip(letters, str(series.axes).upper()))
    return InputImage(path, letters, tuple(series.shape), np.dtype(series.dtype), _ome_pixel_size(tif),
                      array, tif.close)


def _ome_pixel_size(tif: tifffile.TiffFile) -> dict[str, tuple[float, str]]:
    if not tif.ome_metadata:
        return {}
    pixels = next((e for e in ET.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels")), None)
    out = {}
    for letter in "XYZ" if pixels is not None else "":
        value = pixels.get(f"PhysicalSize{letter}")
        if value is not None:
            unit = pixels.get(f"PhysicalSize{letter}Unit", "µm")
            out[letter] = (float(value), "micrometer" if unit in ("µm", "um") else unit)
    return out


def _open_zarr(path: Path) -> InputImage:
    import zarr

    try:
        group = zarr.open_group(path, mode="r")
        attrs = dict(group.attrs)
        meta = attrs.get("ome", attrs)["multiscales"][0]
        names = [a["name"].upper() if isinstance(a, dict) else a.upper() for a in meta["axes"]]
        level0 = meta["datasets"][0]
        array = group[level0["path"]]
    except Exception as exc:
        raise DataError(f"{path}: not an OME-Zarr image this version can read ({exc})") from exc
    scale = next((t["scale"] for t in level0.get("coordinateTransformations", []) if t["type"] == "scale"), None)
    units = {a["name"].upper(): a.get("unit", "") for a in meta["axes"] if isinstance(a, dict)}
    pixel_size = ({a: (float(s), units.get(a, "")) for a, s in zip(names, scale) if a in "XYZ"} if scale else {})
    return InputImage(path, "".join(names), tuple(array.shape), np.dtype(array.dtype), pixel_size, array)

