"""Intensity normalisation: the ONE transform from raw pixels to network input, for training and prediction.

Why this module exists: a model only works on images normalised exactly the way its training
tiles were. Two modes:

- ``percentile`` (the default; cellpose and StarDist/csbdeep do this): per image and channel,
  ``(x - p_low) / (p_high - p_low)`` with the image's own ``low``/``high`` percentiles (1 and 99.8
  by default), not clipped. Exposure, camera offset, bit depth and float scaling of an image then
  cancel out, so a model survives another microscope. "Per image" means the whole image (one frame
  of a stack), never a training tile: prediction sees whole images, so training tiles carry the
  percentiles of the image they were cut from (computed when sharding, see `PERCENTILE_GRID`).
- ``dataset``: clip each channel to the training set's 0.5/99.5 percentiles, then z-score with the
  clipped mean and std (`IntensityStats`, stored in the manifest). Exact for one microscope's
  images, wrong for any other exposure or offset.

Percentiles of images larger than `MAX_PIXELS` come from a fixed, regular sample of regions
(`image_percentiles`), so they are cheap for huge images and the same wherever they are computed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MODES = ("percentile", "dataset")
DEFAULT_PERCENTILES = (1.0, 99.8)  # StarDist's; cellpose uses (1, 99)
# The per-image percentiles stored with every training tile; data.normalize.low/high must be among them.
PERCENTILE_GRID = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 50.0, 90.0, 95.0, 97.0, 98.0, 99.0, 99.5, 99.8,
                   99.9, 100.0)
MAX_PIXELS = 4_000_000  # per channel: larger images are sampled in regions of REGION x REGION pixels
REGION = 128


@dataclass(frozen=True)
class IntensityStats:
    """Per-channel train-split statistics used by the ``dataset`` mode."""

    low: tuple[float, ...]
    high: tuple[float, ...]
    clipped_mean: tuple[float, ...]
    clipped_std: tuple[float, ...]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> IntensityStats:
        return cls(*(tuple(float(v) for v in raw[k]) for k in ("low", "high", "clipped_mean", "clipped_std")))

    def to_dict(self) -> dict[str, list[float]]:
        return {"low": list(self.low), "high": list(self.high), "clipped_mean": list(self.clipped_mean),
                "clipped_std": list(self.clipped_std)}


@dataclass(frozen=True)
class Normalization:
    """Which transform a model was trained with; travels in checkpoints and model files.

    Attributes:
        mode: ``percentile`` or ``dataset`` (see the module docstring).
        stats: the training set's statistics (always kept: the ``dataset`` mode uses them, and
            prediction compares new images with them).
        percentiles: ``percentile`` mode: the (low, high) percentiles of each image.
        max_pixels: ``percentile`` mode: images with more pixels per channel are sampled.
    """

    mode: str
    stats: IntensityStats
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"normalisation mode {self.mode!r} must be one of {', '.join(MODES)}")
        low, high = self.percentiles
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"normalisation percentiles {self.percentiles} must satisfy 0 <= low < high <= 100")

    @property
    def channels(self) -> int:
        return len(self.stats.low)

    def to_dict(self) -> dict[str, Any]:
        """The small dict stored as ``data.normalization`` in checkpoints and model files."""
        if self.mode == "dataset":
            return {"mode": "dataset"}
        return {"mode": "percentile", "percentiles": list(self.percentiles), "max_pixels": self.max_pixels}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, stats: IntensityStats | Mapping[str, Any]) -> Normalization:
        """Read ``data.normalization`` (absent in files written before it existed: ``dataset`` mode)."""
        stats = stats if isinstance(stats, IntensityStats) else IntensityStats.from_dict(stats)
        raw = raw or {"mode": "dataset"}
        mode = str(raw.get("mode", "dataset"))
        if mode == "dataset":
            return cls("dataset", stats)
        low, high = (float(v) for v in raw.get("percentiles", DEFAULT_PERCENTILES))
        return cls(mode, stats, (low, high), int(raw.get("max_pixels", MAX_PIXELS)))

    def bounds(self, image: np.ndarray) -> np.ndarray | None:
        """C x 2 (low, high) of one C x H x W image in ``percentile`` mode; None in ``dataset`` mode."""
        if self.mode == "dataset":
            return None
        return image_percentiles(image, "CYX", self.percentiles, self.max_pixels)


def _check_axes(shape: tuple[int, ...], axes: str) -> str:
    """`axes` in upper case, checked against the shape."""
    axes = axes.upper()
    if len(axes) != len(shape) or not axes.endswith("YX") or len(set(axes)) != len(axes):
        raise ValueError(f"axes {axes!r} do not describe an array of shape {shape} ending in YX")
    return axes


def image_percentiles(array: Any, axes: str, percentiles: Sequence[float],
                      max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Per-channel percentiles (C x len(percentiles), float64; C = 1 without a C axis) of a whole image.

    `array` is anything with numpy-style basic slicing and a `.shape` (a numpy array, or a lazy
    reader that reads only the requested region); `axes` names its dimensions (e.g. "YX", "CYX",
    "TCZYX"). Percentiles are over all pixels of a channel (numpy's linear rule, as csbdeep), or,
    with more than `max_pixels` pixels per channel, over a regular grid of REGION x REGION regions
    centred in equal strata of the planes and of the plane, about `max_pixels` pixels in all. The sample
    depends only on the shape, so every process computes the same values.
    """
    shape = tuple(int(n) for n in array.shape)
    axes = _check_axes(shape, axes)
    c_axis = axes.find("C")
    plane_axes = [i for i, a in enumerate(axes[:-2]) if a != "C"]
    planes = math.prod(shape[i] for i in plane_axes)
    height, width = shape[-2:]
    if planes * height * width <= max_pixels:
        values = _channels_first(np.asarray(array[...]), c_axis)
    else:
        c_block = c_axis - sum(i < c_axis for i in plane_axes) if c_axis >= 0 else -1  # plane axes are indexed away
        values = np.concatenate([_channels_first(np.asarray(array[index]), c_block)
                                 for index in _regions(shape, plane_axes, max_pixels)], axis=1)
    return np.percentile(values, list(percentiles), axis=1).T.astype(np.float64)


def _channels_first(block: np.ndarray, c_axis: int) -> np.ndarray:
    """C x N float64 pixels of a block (C = 1 when there is no channel axis)."""
    if c_axis < 0:
        return block.reshape(1, -1).astype(np.float64)
    return np.moveaxis(block, c_axis, 0).reshape(block.shape[c_axis], -1).astype(np.float64)


def _regions(shape: tuple[int, ...], plane_axes: list[int], max_pixels: int) -> list[tuple]:
    """Index tuples of the sampled regions: evenly spaced planes, a regular grid of regions in each."""
    height, width = shape[-2:]
    rh, rw = min(REGION, height), min(REGION, width)
    wanted = max(1, math.ceil(max_pixels / (rh * rw)))
    planes = math.prod(shape[i] for i in plane_axes)
    use = min(planes, wanted)
    per_plane = math.ceil(wanted / use)
    rows = max(1, min(height // rh, round(math.sqrt(per_plane * height / width))))
    cols = max(1, min(width // rw, math.ceil(per_plane / rows)))
    ys = _centred(height, rh, rows)
    xs = _centred(width, rw, cols)
    out = []
    for p in np.linspace(0, planes - 1, use).round().astype(int):
        coords = np.unravel_index(int(p), [shape[i] for i in plane_axes]) if plane_axes else ()
        lead: list[Any] = [slice(None)] * (len(shape) - 2)
        for i, value in zip(plane_axes, coords):
            lead[i] = int(value)
        out += [tuple(lead) + (slice(y, y + rh), slice(x, x + rw)) for y in ys for x in xs]
    return out


def _centred(size: int, region: int, count: int) -> np.ndarray:
    """Starts of `count` regions centred in equal strata of the axis (a stratified sample, not edge-heavy)."""
    centres = (np.arange(count) + 0.5) * size / count
    return np.clip(np.round(centres - region / 2), 0, size - region).astype(int)


def normalize(image: np.ndarray, norm: Normalization | IntensityStats | Mapping[str, Any],
              bounds: np.ndarray | Sequence[Sequence[float]] | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """float32 network input from raw pixels; the one transform of training and prediction.

    `image` is C x H x W or N x C x H x W (channels on axis -3), or H x W for one channel. `norm`
    is a `Normalization`, or dataset statistics (`IntensityStats` or its dict) for the ``dataset``
    mode. ``percentile`` mode needs `bounds`: C x 2 (low, high) percentiles of the WHOLE image the
    pixels belong to (`Normalization.bounds` of it, or the values stored with a training tile).
    With `out` (float32, the image's shape) the result is written there.
    """
    if not isinstance(norm, Normalization):
        norm = Normalization("dataset", norm if isinstance(norm, IntensityStats) else IntensityStats.from_dict(norm))
    channels = norm.channels
    shape = (channels, 1, 1) if image.ndim >= 3 else ()
    if image.ndim == 2 and channels != 1:
        raise ValueError(f"an H x W image has one channel but the normalisation has {channels}")
    if image.ndim >= 3 and image.shape[-3] != channels:
        raise ValueError(f"image has {image.shape[-3]} channels on axis -3 but the normalisation has {channels}")
    if out is None:
        out = np.empty(image.shape, np.float32)
    if norm.mode == "dataset":
        s = norm.stats
        low, high, mean, std = (np.asarray(v, np.float32).reshape(shape) for v in
                                (s.low, s.high, s.clipped_mean, s.clipped_std))
        np.clip(image, low, high, out=out)  # computed in float32 (uint16 and float32 promote to float32)
        np.subtract(out, mean, out=out)
        return np.divide(out, np.maximum(std, np.float32(1e-6)), out=out)
    if bounds is None:
        raise ValueError("percentile normalisation needs the whole image's percentiles (bounds)")
    b = np.asarray(bounds, np.float64).reshape(channels, 2)
    low = b[:, 0].astype(np.float32).reshape(shape)
    scale = b[:, 1] - b[:, 0]
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32).reshape(shape)  # a flat image stays flat, not inf
    np.subtract(image, low, out=out, dtype=np.float32)
    return np.divide(out, scale, out=out)


def grid_columns(grid: Sequence[float], percentiles: Sequence[float], where: str) -> list[int]:
    """Positions of `percentiles` in the per-image percentiles stored with training tiles (ValueError if absent)."""
    grid = [float(p) for p in grid]
    missing = [p for p in percentiles if float(p) not in grid]
    if missing:
        raise ValueError(f"{where}: percentile(s) {', '.join(f'{p:g}' for p in missing)} are not among those stored "
                         f"per image in the shards ({', '.join(f'{p:g}' for p in grid)}); pick from these")
    return [grid.index(float(p)) for p in percentiles]


def grid_bounds(stored: Sequence[Sequence[float]], columns: Sequence[int]) -> np.ndarray:
    """C x 2 bounds picked from a tile's stored per-image percentiles (C x len(grid)) at `grid_columns`."""
    return np.asarray(stored, np.float64)[:, list(columns)]


def unusual_intensity(image: np.ndarray, norm: Normalization, trained_dtype: str = "") -> str | None:
    """Why a C x H x W image's intensities are far from what a model trained with `norm` saw, or None.

    ``dataset`` mode maps intensities with the training set's fixed statistics, so an image whose
    0.5-99.5 percentile range is less than a third or more than 3 times the training range, or
    shifted by more than half of it, or of another dtype, gets a poor input. ``percentile`` mode
    absorbs all of that; only a flat channel, or an integer image with under 10 grey levels between
    its percentiles (heavily under-exposed), is a problem there.
    """
    problems = []
    if norm.mode == "dataset":
        if trained_dtype and str(image.dtype) != trained_dtype:
            problems.append(f"dtype {image.dtype} (trained on {trained_dtype})")
        ranges = image_percentiles(image, "CYX", (0.5, 99.5), norm.max_pixels)
        for c, (low, high) in enumerate(ranges):
            t_low, t_high = norm.stats.low[c], norm.stats.high[c]
            span = max(t_high - t_low, 1e-12)
            if not (1 / 3 <= (high - low) / span <= 3 and abs(low - t_low) <= span / 2):
                problems.append(f"channel {c} 0.5-99.5 percentile range [{low:g}, {high:g}] vs [{t_low:g}, "
                                f"{t_high:g}] in training")
        advice = "the model normalises with its training set's statistics (data.normalize.mode=dataset); " \
                 "expect poor results, or retrain with data.normalize.mode=percentile"
    else:
        ranges = image_percentiles(image, "CYX", norm.percentiles, norm.max_pixels)
        for c, (low, high) in enumerate(ranges):
            if high <= low:
                problems.append(f"channel {c} is flat between its {norm.percentiles} percentiles ({low:g})")
            elif image.dtype.kind in "ui" and high - low < 10:
                problems.append(f"channel {c} has only {high - low:g} grey levels between its percentiles")
        advice = "the normalised image is mostly noise or empty"
    return None if not problems else f"intensities far from what the model saw: {'; '.join(problems)}; {advice}"
