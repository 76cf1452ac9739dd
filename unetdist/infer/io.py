"""Input files as frames the model can take, and output files written once, completely or not at all.

Why this module exists: prediction must know every input's geometry before reading its pixels
(to share the work between ranks) and must map any of TIFF/PNG/npy, 2-D, multi-channel or a
stack of frames onto C x H x W frames and back onto the input's geometry. Reading and the axes
rule are `unetdist.data.inputs`' (`array_header`, `image_axes`, `load_array`, `as_frames`), so
prediction sees a file exactly as `unetdist shard` does. One addition: with automatic axes the
model's channel count settles what the file leaves open: a 1-channel model reads a 3-D array
without TIFF metadata (C x H x W by the rule) as a T x H x W stack, and a C-channel model reads
a plain C-page TIFF (T x H x W by its metadata) as one C-channel image.

Outputs have the input's geometry without channels: H x W for one frame, T x H x W for a stack.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from unetdist.data.errors import DataError
from unetdist.data.inputs import SUFFIXES, array_header, as_frames, image_axes, load_array

_BIGTIFF_BYTES = 2**31


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
        elif os.path.isdir(pattern):
            matches = sorted(str(p) for p in Path(pattern).iterdir() if p.suffix.lower() in SUFFIXES)
            if not matches:
                raise FileNotFoundError(f"{pattern}: folder holds no {'/'.join(SUFFIXES)} files")
        elif os.path.exists(pattern):
            matches = [pattern]
        else:
            raise FileNotFoundError(f"{pattern}: no such file")
        found.extend(Path(m) for m in matches)
    unique = list(dict.fromkeys(found))
    if not unique:
        raise FileNotFoundError("no input files given")
    return unique


@dataclass(frozen=True)
class OutputPaths:
    """Where one input's outputs go: `<stem>_labels.tif`, `_probs.tif`, `_instances.tif`."""

    labels: Path
    probs: Path
    instances: Path


def output_paths(inputs: list[Path], out_dir: Path) -> list[OutputPaths]:
    """Output names for every input; two inputs with the same file stem are an error naming both."""
    seen: dict[str, Path] = {}
    out = []
    for path in inputs:
        stem = path.stem
        if stem in seen:
            raise DataError(f"{seen[stem]} and {path} would both write {stem}_labels.tif; rename one or "
                            "predict them into different folders")
        seen[stem] = path
        out.append(OutputPaths(*(out_dir / f"{stem}_{kind}.tif" for kind in ("labels", "probs", "instances"))))
    return out


class OutputWriter:
    """Writes one input's outputs frame by frame; each file appears under its final name only when complete.

    Probability maps (large) are streamed to disk frame by frame, uncompressed; label and
    instance maps (small) are kept until `close` and written zlib-compressed, instances as
    uint16 or, past 65,535 objects in a frame, uint32.
    """

    def __init__(self, paths: OutputPaths, layout: FrameLayout, num_classes: int, prob_dtype: str | None,
                 instances: bool) -> None:
        self.paths, self.layout = paths, layout
        self.labels: list[np.ndarray] = []
        self.instances: list[np.ndarray] | None = [] if instances else None
        self.prob_dtype = np.dtype(prob_dtype) if prob_dtype else None
        self._probs: tifffile.TiffWriter | None = None
        if self.prob_dtype is not None:
            size = layout.pixels * num_classes * self.prob_dtype.itemsize
            paths.probs.parent.mkdir(parents=True, exist_ok=True)
            self._probs = tifffile.TiffWriter(_tmp(paths.probs), bigtiff=size >= _BIGTIFF_BYTES)

    def add(self, labels: np.ndarray, probs: np.ndarray | None = None, instances: np.ndarray | None = None) -> None:
        """One frame: H x W class labels, K x H x W probabilities, H x W instance ids."""
        self.labels.append(labels)
        if self.instances is not None:
            if instances is None:
                raise ValueError("this writer was opened for instance maps; pass them")
            self.instances.append(instances)
        if self._probs is not None:
            if probs is None:
                raise ValueError("this writer was opened for probability maps; pass them")
            self._probs.write(probs.astype(self.prob_dtype, copy=False), contiguous=True, photometric="minisblack")

    def close(self) -> list[Path]:
        """Finish every file and rename it into place; returns the files written."""
        if len(self.labels) != self.layout.frames:
            raise RuntimeError(f"{self.paths.labels}: {len(self.labels)} of {self.layout.frames} frames predicted")
        written = [self._write(self.paths.labels, self.labels, np.uint8)]
        if self.instances is not None:
            top = max((int(i.max()) for i in self.instances if i.size), default=0)
            written.append(self._write(self.paths.instances, self.instances,
                                       np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32))
        if self._probs is not None:
            self._probs.close()
            self._probs = None
            os.replace(_tmp(self.paths.probs), self.paths.probs)
            written.append(self.paths.probs)
        return written

    def abort(self) -> None:
        if self._probs is not None:
            self._probs.close()
            self._probs = None
        _tmp(self.paths.probs).unlink(missing_ok=True)

    def _write(self, path: Path, frames: list[np.ndarray], dtype: type) -> Path:
        array = np.stack(frames).astype(dtype, copy=False) if self.layout.stack else frames[0].astype(dtype, copy=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp(path)
        tifffile.imwrite(tmp, array, photometric="minisblack", compression="zlib",
                         bigtiff=array.nbytes >= _BIGTIFF_BYTES)
        os.replace(tmp, path)
        return path


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")
