"""Opening microscopy images lazily: one `open_image` for TIFF/OME-TIFF, OME-Zarr, .npy, PNG, CZI and ND2.

Whole-slide scans and long time-lapses are larger than memory, so shard writing and prediction
read regions, not files. `open_image` returns an `ImageSource` whose `array` answers numpy-style
basic slicing (ints and slices) by reading only that region:

- tiled, pyramidal or compressed TIFF / OME-TIFF: tifffile's zarr store (`aszarr`), chunk by chunk
  (tiles, or strips of rows for untiled files: an untiled TIFF is read in row bands);
- uncompressed contiguous TIFF and .npy: a memory map;
- OME-Zarr (NGFF 0.4 and 0.5): zarr, level 0 by default, axes and pixel size from the multiscales;
- CZI and ND2: through the optional `formats` extra (pylibCZIrw, nd2), plane by plane.

Axes are letters over T, C, Z, Y, X in storage order and always end in "YX" (a channel-last file
such as RGB is presented channel-first, still lazily). With `axes="auto"` they come from the file's
metadata (OME, ImageJ, NGFF): S (samples) counts as C, and one other non-spatial axis (Q, I, ...)
as T (frames). A given `axes` string names the file's own storage order, e.g. "TZCYX" or "YXC".
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unetdist.data.errors import DataError
from unetdist.data.inputs import read_png

AXES = "TCZYX"
EXTRA_HINT = "pip install 'unetdist[formats]'"
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
SUFFIXES = TIFF_SUFFIXES + (".zarr", ".npy", ".png", ".czi", ".nd2")


@dataclass(frozen=True)
class ImageSource:
    """A lazily read image: its axes, shape, dtype, pixel size and region-readable arrays.

    Use as a context manager (or call `close`) to release file handles.
    """

    path: Path
    axes: str
    shape: tuple[int, ...]
    dtype: np.dtype
    pixel_size: dict[str, tuple[float, str]]
    array: Any
    levels: tuple[Any, ...]
    closer: Callable[[], None] = field(default=lambda: None, repr=False, compare=False)

    def close(self) -> None:
        self.closer()

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def sizes(self) -> dict[str, int]:
        return dict(zip(self.axes, self.shape))


class AxesError(DataError):
    """A file whose axes metadata does not map onto T, C, Z, Y, X (its array `shape` is kept)."""

    def __init__(self, message: str, shape: tuple[int, ...]) -> None:
        super().__init__(message)
        self.shape = shape


class AxesView:
    """A lazy view of an array with its axes reordered, and axes left out fixed at an index (0 by default).

    Slicing it in the view's axes order slices the underlying array (so only the region is read)
    and transposes the result; `base` may be anything with numpy-style basic slicing. With
    `fixed={"T": 3, "Z": 7}` a TZCYX array is seen as one CYX frame.
    """

    def __init__(self, base: Any, source_axes: str, axes: str, fixed: dict[str, int] | None = None) -> None:
        shape = tuple(int(n) for n in base.shape)
        self.fixed = dict(fixed or {})
        for letter, size in zip(source_axes, shape):
            if letter not in axes and letter not in self.fixed and size != 1:
                raise ValueError(f"axis {letter} of size {size} cannot be dropped")
        self.base, self.source_axes, self.axes = base, source_axes, axes
        self.shape = tuple(shape[source_axes.index(a)] for a in axes)
        self.dtype = np.dtype(base.dtype)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        per_axis = dict(zip(self.axes, expand_key(key, self.ndim)))
        source_key = tuple(per_axis.get(a, self.fixed.get(a, 0)) for a in self.source_axes)
        region = np.asarray(self.base[source_key])
        kept_source = [a for a in self.source_axes if a in per_axis and not isinstance(per_axis[a], int)]
        kept_view = [a for a in self.axes if not isinstance(per_axis[a], int)]
        return region.transpose([kept_source.index(a) for a in kept_view])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)


def expand_key(key: Any, ndim: int) -> list[Any]:
    """A basic-slicing key as one int or slice per axis (Ellipsis expanded)."""
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        at = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:at] + (slice(None),) * (ndim - len(key) + 1) + key[at + 1 :]
    key = tuple(key) + (slice(None),) * (ndim - len(key))
    if len(key) != ndim or not all(isinstance(k, (int, np.integer, slice)) for k in key):
        raise IndexError(f"only basic slicing (ints and slices) over {ndim} axes is supported, got {key!r}")
    return [int(k) if isinstance(k, (int, np.integer)) else k for k in key]


def resolve_axes(path: Path, native: str | None, shape: tuple[int, ...], setting: str) -> tuple[str, str]:
    """(storage axes, presented axes) for an array: letters over TCZYX, presented ones ending in "YX".

    `native` is the file's own axes string (None when the file has none: then 2-D is YX, 3-D is
    YXC when the last axis has at most 4 entries and the first more, otherwise CYX).
    """
    if setting.lower() != "auto":
        storage = setting.upper()
        if len(set(storage)) != len(storage) or not set(storage) <= set(AXES) or not {"Y", "X"} <= set(storage):
            raise DataError(f"axes {setting!r} must use each of {', '.join(AXES)} at most once and include Y and X")
    elif native is not None:
        storage = _map_native(path, native, shape)
    elif len(shape) == 2:
        storage = "YX"
    elif len(shape) == 3:
        storage = "YXC" if shape[-1] <= 4 < shape[0] else "CYX"
    else:
        raise DataError(f"{path}: a {len(shape)}-D array (shape {shape}) needs explicit axes, e.g. --axes TCYX")
    if len(storage) != len(shape):
        example = "TCZYX"[max(0, 5 - len(shape)) :]
        raise DataError(f"{path}: axes {storage!r} do not fit an array of shape {shape}; "
                        f"give one letter per dimension in storage order, e.g. --axes {example}")
    presented = "".join(a for a in storage if a not in "YX" and a in AXES) + "YX"
    return storage, presented


def _map_native(path: Path, native: str, shape: tuple[int, ...]) -> str:
    """File axes (tifffile/NGFF letters) mapped onto TCZYX; size-1 unknown axes become '-' (dropped)."""
    letters = []
    for letter, size in zip(native.upper(), shape):
        if letter in "TCZYX":
            letters.append(letter)
        elif letter == "S":
            letters.append("C")
        else:
            letters.append("T" if size > 1 else "-")
    storage = "".join(letters)
    if any(storage.count(a) > 1 for a in AXES) or storage.count("Y") != 1 or storage.count("X") != 1:
        raise AxesError(f"{path}: file axes {native!r} (shape {shape}) do not map onto T, C, Z, Y, X "
                        "unambiguously; give the storage order with --axes, e.g. --axes TZCYX", shape)
    return storage


def _present(array: Any, storage: str, presented: str) -> Any:
    """The array itself when its storage order is already the presented one, else a lazy AxesView."""
    if storage == presented:
        return array
    return AxesView(array, storage, presented)


def open_image(path: str | Path, axes: str = "auto") -> ImageSource:
    """Open an image file or OME-Zarr folder for lazy region reads (see the module docstring)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if suffix not in SUFFIXES and not (path.is_dir() and _is_zarr(path)):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use TIFF/OME-TIFF, OME-Zarr (.zarr), .npy, "
                        f".png, or .czi/.nd2 with {EXTRA_HINT}")
    try:
        if suffix in TIFF_SUFFIXES:
            return _open_tiff(path, axes)
        if suffix == ".zarr" or path.is_dir():
            return _open_zarr(path, axes)
        if suffix in (".czi", ".nd2"):
            from unetdist.data import readers_extra

            return readers_extra.open_extra(path, axes)
        return _open_plain(path, axes)
    except DataError:
        raise
    except Exception as exc:  # the format libraries raise many types; name the file
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def _source(path: Path, native: str | None, levels: list[Any], setting: str,
            pixel_size: dict[str, tuple[float, str]], closer: Callable[[], None] = lambda: None) -> ImageSource:
    shape = tuple(int(n) for n in levels[0].shape)
    dtype = np.dtype(levels[0].dtype)
    try:
        storage, presented = resolve_axes(path, native, shape, setting)
        if dtype.kind not in "uifb":
            raise DataError(f"{path}: pixel type {dtype} is not a number type")
    except DataError:
        closer()
        raise
    views = []
    for level in levels:
        if len(level.shape) != len(storage):
            break  # a pyramid level of another rank: keep the levels that match
        views.append(_present(level, storage, presented))
    array = views[0]
    return ImageSource(path=path, axes=presented, shape=tuple(array.shape), dtype=dtype,
                       pixel_size={a: v for a, v in pixel_size.items() if a in presented}, array=array,
                       levels=tuple(views), closer=closer)


# --- TIFF / OME-TIFF -----------------------------------------------------------------------------------------


def _open_tiff(path: Path, setting: str) -> ImageSource:
    import tifffile
    import zarr

    tif = tifffile.TiffFile(path)
    try:
        series = tif.series[0]
        native = str(series.axes)
        pixel_size = _tiff_pixel_size(tif, series)
        stores: list[Any] = []
        if len(series.levels) == 1 and series.dataoffset is not None:
            levels = [tifffile.memmap(path, series=0, mode="r")]  # uncompressed and contiguous
        else:
            stores = [series.aszarr(level=number) for number in range(len(series.levels))]
            levels = [zarr.open(store, mode="r") for store in stores]
    except Exception:
        tif.close()
        raise

    def close() -> None:
        for store in stores:
            store.close()
        tif.close()

    return _source(path, native, levels, setting, pixel_size, close)


def _tiff_pixel_size(tif: Any, series: Any) -> dict[str, tuple[float, str]]:
    """Physical pixel size from OME-XML, else from ImageJ metadata and the resolution tags."""
    if tif.is_ome and tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
        except ET.ParseError:
            return {}
        pixels = next((e for e in root.iter() if e.tag.endswith("}Pixels") or e.tag == "Pixels"), None)
        out = {}
        for axis in "XYZ":
            value = pixels.get(f"PhysicalSize{axis}") if pixels is not None else None
            if value is not None and float(value) > 0:
                out[axis] = (float(value), _unit(pixels.get(f"PhysicalSize{axis}Unit", "µm")))
        return out
    page = series.pages[0] if series.pages else None
    if page is None:
        return {}
    imagej = tif.imagej_metadata or {}
    unit = _unit(str(imagej.get("unit", ""))) if imagej.get("unit") else None
    out = {}
    for axis, tag in (("X", "XResolution"), ("Y", "YResolution")):
        res = page.tags.get(tag)
        if res is None or not res.value or not res.value[0]:
            continue
        per_unit = res.value[0] / res.value[1]
        resunit = page.tags.get("ResolutionUnit")
        tag_unit = {2: "inch", 3: "centimeter"}.get(int(resunit.value) if resunit is not None else 2)
        if unit is not None:
            out[axis] = (1.0 / per_unit, unit)
        elif tag_unit == "centimeter" and per_unit != 1:
            out[axis] = (1e4 / per_unit, "micrometer")
    if "spacing" in imagej and unit is not None:
        out["Z"] = (float(imagej["spacing"]), unit)
    return out


UNITS = {"µm": "micrometer", "um": "micrometer", "micron": "micrometer", "microns": "micrometer",
         "\\u00B5m": "micrometer", "nm": "nanometer", "mm": "millimeter", "cm": "centimeter", "m": "meter",
         "s": "second", "ms": "millisecond"}


def _unit(text: str) -> str:
    """OME/ImageJ unit symbols as NGFF unit names (µm -> micrometer)."""
    return UNITS.get(text.strip(), text.strip() or "micrometer")


# --- OME-Zarr ------------------------------------------------------------------------------------------------


def _is_zarr(path: Path) -> bool:
    return any((path / name).exists() for name in ("zarr.json", ".zattrs", ".zgroup", ".zarray"))


def _open_zarr(path: Path, setting: str) -> ImageSource:
    import zarr

    node = zarr.open(str(path), mode="r")
    if not hasattr(node, "attrs") or isinstance(node, zarr.Array):
        return _source(path, None, [node], setting, {})
    attrs = dict(node.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if not multiscales:
        raise DataError(f"{path}: a zarr group without OME-Zarr 'multiscales' metadata; point at an OME-Zarr image "
                        "(NGFF 0.4 or 0.5) or a single zarr array")
    meta = multiscales[0]
    names = [a if isinstance(a, str) else a.get("name", "") for a in meta.get("axes", [])]
    datasets = meta.get("datasets", [])
    levels = [node[d["path"]] for d in datasets]
    if not levels:
        raise DataError(f"{path}: OME-Zarr multiscales lists no datasets")
    native = "".join(n[:1].upper() if len(n) == 1 else "Q" for n in names) if names else None
    if native is not None and len(native) != len(levels[0].shape):
        raise DataError(f"{path}: OME-Zarr axes {names} do not fit level 0 of shape {levels[0].shape}")
    pixel_size = _zarr_pixel_size(meta, datasets[0], names)
    return _source(path, native, levels, setting, pixel_size)


def _zarr_pixel_size(meta: dict, level0: dict, names: list[str]) -> dict[str, tuple[float, str]]:
    """Level 0's scale (times the multiscale-wide scale, if any) for the space axes that name a unit."""
    scale = [1.0] * len(names)
    for transforms in (level0.get("coordinateTransformations", []), meta.get("coordinateTransformations", [])):
        for t in transforms or []:
            if t.get("type") == "scale" and len(t.get("scale", [])) == len(names):
                scale = [a * float(b) for a, b in zip(scale, t["scale"])]
    out = {}
    for axis, value in zip(meta.get("axes", []), scale):
        if isinstance(axis, dict) and axis.get("name", "").upper() in ("X", "Y", "Z") and axis.get("unit"):
            out[axis["name"].upper()] = (float(value), str(axis.get("unit", "")))
    return {a: v for a, v in out.items() if math.isfinite(v[0]) and v[0] > 0}


# --- .npy and PNG --------------------------------------------------------------------------------------------


def _open_plain(path: Path, setting: str) -> ImageSource:
    if path.suffix.lower() == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    else:
        array = read_png(path)
    return _source(path, None, [array], setting, {})
