"""CZI (Zeiss) and ND2 (Nikon) images through their vendors' well-kept readers, an optional extra.

pylibCZIrw (Zeiss's libCZI) and nd2 are compiled packages most users of TIFF and OME-Zarr never need,
so they come with `pip install 'unetdist[formats]'`; without them opening such a file says so. Both
are read plane by plane (CZI even by region within a plane), behind the same lazy array interface
as the other readers.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from unetdist.data.errors import DataError
from unetdist.data.readers import EXTRA_HINT, ImageSource, expand_key, _source

PLANE_READER = Callable[[tuple[int, ...], slice, slice], np.ndarray]


class PlaneArray:
    """A lazy array over non-spatial axes + (Y, X) that reads one plane region at a time.

    `read(index, ys, xs)` returns the region ys x xs of the plane at `index` (one int per leading axis).
    """

    def __init__(self, read: PLANE_READER, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.read, self.shape, self.dtype, self.ndim = read, tuple(shape), np.dtype(dtype), len(shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        parts = expand_key(key, self.ndim)
        lead = [range(self.shape[i])[p] if isinstance(p, slice) else [range(self.shape[i])[p]]
                for i, p in enumerate(parts[:-2])]
        ys, xs = (slice(*p.indices(n)) if isinstance(p, slice) else slice(p, p + 1)
                  for p, n in zip(parts[-2:], self.shape[-2:]))
        height, width = len(range(*ys.indices(self.shape[-2]))), len(range(*xs.indices(self.shape[-1])))
        out = np.empty([len(r) for r in lead] + [height, width], self.dtype)
        for position in itertools.product(*[range(len(r)) for r in lead]):
            index = tuple(int(r[p]) for r, p in zip(lead, position))
            out[position] = self.read(index, ys, xs)
        squeeze = tuple(i for i, p in enumerate(parts) if isinstance(p, (int, np.integer)))
        return out.squeeze(axis=squeeze) if squeeze else out


def _missing(path: Path, module: str, exc: ImportError) -> DataError:
    return DataError(f"{path}: reading {path.suffix.lower()} files needs the optional '{module}' package: "
                     f"{EXTRA_HINT} ({exc.msg})")


def open_extra(path: Path, axes: str) -> ImageSource:
    """Open a .czi or .nd2 file lazily; a clear error naming the extra when its reader is missing."""
    if path.suffix.lower() == ".czi":
        return _open_czi(path, axes)
    return _open_nd2(path, axes)


def _open_czi(path: Path, setting: str) -> ImageSource:
    try:
        from pylibCZIrw import czi as pyczi
    except ImportError as exc:
        raise _missing(path, "pylibCZIrw", exc) from exc
    stack = contextlib.ExitStack()
    doc = stack.enter_context(pyczi.open_czi(str(path)))
    try:
        box = doc.total_bounding_box
        rect = doc.total_bounding_rectangle
        lead = [a for a in "TZC" if a in box and box[a][1] - box[a][0] > 1]
        sample = doc.read(plane={a: box[a][0] for a in "TZC" if a in box}, roi=(rect.x, rect.y, 1, 1))
        dtype = sample.dtype

        def read(index: tuple[int, ...], ys: slice, xs: slice) -> np.ndarray:
            plane = {a: box[a][0] for a in "TZC" if a in box} | {a: box[a][0] + i for a, i in zip(lead, index)}
            y0, y1, _ = ys.indices(rect.h)
            x0, x1, _ = xs.indices(rect.w)
            region = doc.read(plane=plane, roi=(rect.x + x0, rect.y + y0, max(x1 - x0, 1), max(y1 - y0, 1)))
            return region[..., 0][: y1 - y0, : x1 - x0][:: ys.step or 1, :: xs.step or 1]

        shape = tuple(box[a][1] - box[a][0] for a in lead) + (rect.h, rect.w)
        array = PlaneArray(read, shape, dtype)
        pixel_size = _czi_pixel_size(doc.metadata)
    except Exception:
        stack.close()
        raise
    return _source(path, "".join(lead) + "YX", [array], setting, pixel_size,
                   stack.close)


def _czi_pixel_size(metadata: dict) -> dict[str, tuple[float, str]]:
    """Pixel size from CZI metadata (Scaling/Items/Distance, in meters) in micrometers."""
    try:
        distances = metadata["ImageDocument"]["Metadata"]["Scaling"]["Items"]["Distance"]
    except (KeyError, TypeError):
        return {}
    out = {}
    for item in distances if isinstance(distances, list) else [distances]:
        axis, value = item.get("@Id"), float(item.get("Value") or 0)
        if axis in ("X", "Y", "Z") and value > 0:
            out[axis] = (value * 1e6, "micrometer")
    return out


def _open_nd2(path: Path, setting: str) -> ImageSource:
    try:
        import nd2
    except ImportError as exc:
        raise _missing(path, "nd2", exc) from exc
    handle = nd2.ND2File(str(path))
    try:
        sizes = dict(handle.sizes)
        loops = [a for a in sizes if a not in "CYXS"]
        frame_axes = [a for a in sizes if a in "CYXS"]
        loop_shape = tuple(sizes[a] for a in loops)

        def read(index: tuple[int, ...], ys: slice, xs: slice) -> np.ndarray:
            loop_index = index[: len(loops)]
            flat = int(np.ravel_multi_index(loop_index, loop_shape)) if loops else 0
            frame = np.asarray(handle.read_frame(flat))
            frame = frame.reshape([sizes[a] for a in frame_axes])
            inner = index[len(loops):]
            return frame[tuple(inner) + (ys, xs)] if frame_axes[-2:] == ["Y", "X"] else frame[ys, xs][..., inner[0]]

        native = "".join(loops) + "".join(a for a in frame_axes if a not in "YX") + "YX"
        shape = tuple(sizes[a] for a in loops) + tuple(sizes[a] for a in frame_axes if a not in "YX") + (
            sizes["Y"], sizes["X"])
        array = PlaneArray(read, shape, handle.dtype)
        voxel = handle.voxel_size()
        pixel_size = {a: (float(v), "micrometer") for a, v in zip("XYZ", voxel) if v and v > 0}
    except Exception:
        handle.close()
        raise
    return _source(path, native.replace("P", "T") if "T" not in native else native, [array], setting,
                   pixel_size, handle.close)
