"""Prediction outputs written as they are computed: a chunked work store, then OME-Zarr or tiled OME-TIFF.

Why this module exists: the outputs of a whole-slide image do not fit in memory, several ranks
write parts of one image, and a long prediction that is killed should not start over. So every
input gets a work folder `<out>/.<name>.predicting/` holding one zarr array per output (labels,
probabilities) in its final layout, chunked `chunk` x `chunk` pixels per frame. A *unit* of work
is one chunk row of one frame; ranks write disjoint units, and a unit's completion record
(`done/<frame>_<row>`) is written after its chunks, so a restarted prediction redoes only the
units without one. `run.json` records what is being predicted; a restart with other settings is
refused. When every unit is done, the owner finishes the file: instances, a multiscale pyramid
of labels and instances, OME-NGFF metadata (axes, pixel size copied from the input), and then
either moves the stores into place (`<name>_labels.zarr`) or exports them as tiled OME-TIFF
(`<name>_labels.tif`, zlib, BigTIFF only when needed), band by band, never holding a whole image.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import tifffile

from unetdist.data.errors import DataError
from unetdist.infer.source import InputImage

KINDS = ("labels", "probs", "instances")
FORMATS = ("auto", "zarr", "tiff")
PROB_DTYPES = ("float32", "uint8")
NGFF_VERSIONS = ("0.4", "0.5")
TIFF_TILE = 256
BLOCK_CHUNKS = 4  # a column block is this many chunks wide: a 1024 px chunk streams 4096 px wide bands
_BIGTIFF_BYTES = 2**31 - 2**25  # leave room for the tags and offsets of a classic TIFF
_UNITS = {"T": "second", "Z": "micrometer", "Y": "micrometer", "X": "micrometer"}


@dataclass(frozen=True)
class OutputSpec:
    """What is written for each input.

    Attributes:
        probabilities: also write per-class probabilities.
        prob_dtype: ``float32``, or ``uint8`` scaled to 0..255 (ImageJ cannot open float16).
        instances: also write instance ids.
        format: ``zarr`` (OME-Zarr), ``tiff`` (tiled OME-TIFF) or ``auto``: zarr for frames of more
            than `zarr_above` megapixels.
        zarr_above: the ``auto`` threshold in megapixels per frame.
        chunk: chunk (and work unit) size in pixels.
        ngff: OME-NGFF version of zarr outputs (0.4: zarr v2, read by most viewers; 0.5: zarr v3).
        overwrite: replace existing outputs (otherwise an existing output is an error).
    """

    probabilities: bool = False
    prob_dtype: str = "float32"
    instances: bool = False
    format: str = "auto"
    zarr_above: float = 64.0
    chunk: int = 1024
    ngff: str = "0.4"
    overwrite: bool = False

    def validate(self) -> None:
        for name, value, allowed in (("prob_dtype", self.prob_dtype, PROB_DTYPES), ("format", self.format, FORMATS),
                                     ("ngff", self.ngff, NGFF_VERSIONS)):
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if self.chunk < 16 or self.chunk % 16:
            raise ValueError(f"chunk must be a multiple of 16 (TIFF tiles), at least 16; got {self.chunk}")

    def format_for(self, image: InputImage) -> str:
        if self.format != "auto":
            return self.format
        return "zarr" if image.height * image.width > self.zarr_above * 1e6 else "tiff"

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("labels",) + (("probs",) if self.probabilities else ()) + (("instances",) if self.instances else ())


def output_name(path: Path) -> str:
    """The stem outputs are named after: `fov_00.ome.tif` -> `fov_00`, `slide.ome.zarr` -> `slide`."""
    name = path.name.rstrip("/")
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr", ".npy", ".png"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def final_path(out_dir: Path, name: str, kind: str, fmt: str) -> Path:
    return out_dir / f"{name}_{kind}.{'zarr' if fmt == 'zarr' else 'tif'}"


def output_axes(image: InputImage, kind: str) -> str:
    """Axes of an output in NGFF order: frame axes, classes as C for probabilities, then YX."""
    frames = image.frame_axes
    if kind == "probs":
        return ("T" if "T" in frames else "") + "C" + ("Z" if "Z" in frames else "") + "YX"
    return frames + "YX"


class WorkStore:
    """The work folder of one input (see the module docstring)."""

    def __init__(self, out_dir: Path, image: InputImage, spec: OutputSpec, num_classes: int) -> None:
        self.out_dir, self.image, self.spec, self.num_classes = out_dir, image, spec, num_classes
        self.name = output_name(image.path)
        self.root = out_dir / f".{self.name}.predicting"
        self.fmt = spec.format_for(image)
        self.rows = -(-image.height // spec.chunk)
        self.block = spec.chunk * BLOCK_CHUNKS
        self.cols = -(-image.width // self.block)

    @property
    def units(self) -> list[tuple[int, int, int]]:
        """(frame, chunk row, column block) of every unit, in the plan's order."""
        return [(f, r, c) for f in range(self.image.frames) for c in range(self.cols) for r in range(self.rows)]

    def columns(self, col: int) -> tuple[int, int]:
        """Image columns [x0, x1) of column block `col`."""
        return col * self.block, min((col + 1) * self.block, self.image.width)

    def finals(self) -> list[Path]:
        return [final_path(self.out_dir, self.name, k, self.fmt) for k in self.spec.kinds]

    def prepare(self, fingerprint: dict[str, Any]) -> set[tuple[int, int, int]]:
        """Create the work folder, or check the one a killed run left and return the units it finished (rank 0).

        With `overwrite` a partial prediction is thrown away and started afresh.
        """
        existing = [p for p in self.finals() if p.exists()]
        if existing and not self.spec.overwrite:
            raise DataError(f"{existing[0]} exists; pass --overwrite to replace it, or predict into another --out")
        record = self.root / "run.json"
        if self.root.exists() and record.exists() and not self.spec.overwrite:
            if json.loads(record.read_text()) == fingerprint:
                return self.done()
            raise DataError(f"{self.root} holds a partial prediction with other settings (model, options or "
                            "input changed); pass --overwrite to start it afresh, or predict into another --out")
        if self.root.exists():
            shutil.rmtree(self.root)
        (self.root / "done").mkdir(parents=True)
        for kind in ("labels", "probs") if self.spec.probabilities else ("labels",):
            self._create(kind)
        record.write_text(json.dumps(fingerprint, indent=1))
        return set()

    def done(self) -> set[tuple[int, int, int]]:
        found = set()
        for p in (self.root / "done").iterdir():
            frame, row, col = p.name.split("_")
            found.add((int(frame), int(row), int(col)))
        return found

    def _dtype(self, kind: str) -> np.dtype:
        if kind == "probs":
            return np.dtype(self.spec.prob_dtype)
        if kind == "instances":
            return np.dtype(np.uint32)
        return np.dtype(np.uint8 if self.num_classes <= 256 else np.uint16)

    def _shape(self, kind: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        sizes = {**dict(zip(self.image.frame_axes, self.image.frame_shape)), "C": self.num_classes,
                 "Y": self.image.height, "X": self.image.width}
        axes = output_axes(self.image, kind)
        c = self.spec.chunk
        return tuple(sizes[a] for a in axes), tuple(c if a in "YX" else 1 for a in axes)

    def _create(self, kind: str, level: int = 0, shape: tuple[int, ...] | None = None) -> Any:
        import zarr

        full, chunks = self._shape(kind)
        group = zarr.open_group(self.root / f"{kind}.zarr", mode="a", zarr_format=2 if self.spec.ngff == "0.4" else 3)
        return group.create_array(str(level), shape=shape or full, chunks=chunks, dtype=self._dtype(kind),
                                   fill_value=0, overwrite=True)

    def array(self, kind: str, level: int = 0) -> Any:
        import zarr

        return zarr.open_array(self.root / f"{kind}.zarr" / str(level), mode="r+")

    def outputs_of(self, logits: Any) -> dict[str, np.ndarray]:
        """Labels (and probabilities) of a K x rows x W block of float32 logits (torch), in the stored dtypes."""
        out = {"labels": logits.argmax(0).numpy().astype(self._dtype("labels"))}
        if self.spec.probabilities:
            probs = logits.softmax(0).numpy()
            out["probs"] = np.rint(probs * 255.0).astype(np.uint8) if self.spec.prob_dtype == "uint8" else probs
        return out

    def write_unit(self, frame: int, row: int, col: int, outputs: dict[str, np.ndarray]) -> None:
        """Write one unit's outputs (from `outputs_of`), then its completion record."""
        index = dict(zip(self.image.frame_axes, self.image.frame_index(frame)))
        y0 = row * self.spec.chunk
        cols = slice(*self.columns(col))
        for kind, block in outputs.items():
            rows = slice(y0, y0 + block.shape[-2])
            self.array(kind)[_key(output_axes(self.image, kind), index, rows, cols)] = block
        (self.root / "done" / f"{frame}_{row}_{col}").touch()


def _key(axes: str, index: dict[str, int], rows: slice, cols: slice = slice(None)) -> tuple:
    return tuple(index[a] if a in index else rows if a == "Y" else cols if a == "X" else slice(None) for a in axes)


def finish(store: WorkStore, instances: Any = None) -> list[Path]:
    """Instances, pyramid, metadata, then the final files; the work folder is removed. Returns the files."""
    missing = set(store.units) - store.done()
    if missing:
        raise RuntimeError(f"{store.root}: {len(missing)} unit(s) not predicted yet, e.g. {sorted(missing)[0]}")
    if store.spec.instances:
        _write_instances(store, instances)
    written = []
    for kind in store.spec.kinds:
        levels = _pyramid(store, kind) if kind != "probs" and store.fmt == "zarr" else 1
        target = final_path(store.out_dir, store.name, kind, store.fmt)
        if store.fmt == "zarr":
            _write_ngff(store, kind, levels)
            _replace(store.root / f"{kind}.zarr", target)
        else:
            _export_tiff(store, kind, target)
        written.append(target)
    shutil.rmtree(store.root)
    return written


def _write_instances(store: WorkStore, label_instances: Any) -> None:
    """Instance ids frame by frame from the finished labels (a whole frame in memory)."""
    labels = store.array("labels")
    out = store._create("instances")
    axes = output_axes(store.image, "labels")
    for frame in range(store.image.frames):
        index = dict(zip(store.image.frame_axes, store.image.frame_index(frame)))
        key = _key(axes, index, slice(None))
        out[key] = label_instances(np.asarray(labels[key])).astype(np.uint32)


def _pyramid(store: WorkStore, kind: str) -> int:
    """Levels 1.. of a label-like array by taking every second pixel (labels must not be averaged), block by block."""
    level, base = 0, store.array(kind)
    step_y, step_x = 2 * store.spec.chunk, 2 * store.block
    while max(base.shape[-2:]) > store.spec.chunk:
        shape = base.shape[:-2] + tuple(-(-n // 2) for n in base.shape[-2:])
        nxt = store._create(kind, level + 1, shape)
        for y in range(0, base.shape[-2], step_y):
            for x in range(0, base.shape[-1], step_x):
                block = np.asarray(base[..., y:y + step_y, x:x + step_x])[..., ::2, ::2]
                nxt[..., y // 2:y // 2 + block.shape[-2], x // 2:x // 2 + block.shape[-1]] = block
        level, base = level + 1, nxt
    return level + 1


def _scale(store: WorkStore, axes: str, level: int) -> list[float]:
    size = store.image.pixel_size
    return [float(size[a][0]) * (2**level if a in "YX" else 1) if a in size else (2.0**level if a in "YX" else 1.0)
            for a in axes]


def _write_ngff(store: WorkStore, kind: str, levels: int) -> None:
    import zarr

    axes = output_axes(store.image, kind)
    size = store.image.pixel_size
    entries = []
    for a in axes:
        entry: dict[str, str] = {"name": a.lower(), "type": {"T": "time", "C": "channel"}.get(a, "space")}
        if a in "ZYX":
            entry["unit"] = size[a][1] if a in size and size[a][1] else _UNITS[a]
        entries.append(entry)
    datasets = [{"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": _scale(store, axes, k)}]}
                for k in range(levels)]
    multiscale = {"name": f"{store.name}_{kind}", "axes": entries, "datasets": datasets,
                  "type": "nearest" if kind != "probs" else "none"}
    group = zarr.open_group(store.root / f"{kind}.zarr", mode="a")
    if store.spec.ngff == "0.4":
        group.attrs["multiscales"] = [{"version": "0.4", **multiscale}]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}


def _replace(source: Path, target: Path) -> None:
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    os.replace(source, target)


def _export_tiff(store: WorkStore, kind: str, target: Path) -> None:
    """A tiled OME-TIFF of one output, tile row by tile row (instances as uint16 where they fit)."""
    array = store.array(kind)
    axes = output_axes(store.image, kind)
    dtype = array.dtype
    if kind == "instances":
        top = max(int(np.asarray(array[..., y:y + TIFF_TILE, :]).max(initial=0))
                  for y in range(0, array.shape[-2], TIFF_TILE))
        dtype = np.dtype(np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32)
    metadata: dict[str, Any] = {"axes": axes}
    for a, (value, unit) in store.image.pixel_size.items():
        if a in axes:
            metadata[f"PhysicalSize{a}"] = value
            metadata[f"PhysicalSize{a}Unit"] = "µm" if unit in ("micrometer", "") else unit
    tmp = target.with_name(target.name + ".tmp")
    nbytes = int(np.prod(array.shape, dtype=np.int64)) * dtype.itemsize
    tifffile.imwrite(tmp, _tiles(array, dtype), shape=array.shape, dtype=dtype, tile=(TIFF_TILE, TIFF_TILE),
                     compression="zlib", photometric="minisblack", ome=True, metadata=metadata,
                     bigtiff=nbytes >= _BIGTIFF_BYTES)
    _replace(tmp, target)


def _tiles(array: Any, dtype: np.dtype) -> Iterator[np.ndarray]:
    height, width = array.shape[-2:]
    for page in np.ndindex(*array.shape[:-2]):
        for y in range(0, height, TIFF_TILE):
            band = np.asarray(array[page + (slice(y, y + TIFF_TILE), slice(None))]).astype(dtype, copy=False)
            for x in range(0, width, TIFF_TILE):
                yield band[:, x:x + TIFF_TILE]


def fingerprint(image: InputImage, model: dict[str, Any], options: dict[str, Any], spec: OutputSpec) -> dict:
    """What a partial prediction must share with the run that continues it."""
    spec_dict = {k: v for k, v in asdict(spec).items() if k != "overwrite"}
    return {"input": str(image.path), "shape": list(image.shape), "axes": image.axes, "dtype": str(image.dtype),
            "model": model, "options": options, "outputs": spec_dict}
