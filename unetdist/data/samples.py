"""The per-file work of shard writing, run in parallel: survey a pair, and turn one band of a frame into samples.

Two passes, both pure functions of their arguments so that worker processes give the same bytes
as the main process: `survey_pair` reads a pair's image header and its labels, checks them,
measures the foreground of every tile and the intensity percentiles of every whole frame (all
before any shard is written); `frame_samples` reads
one band of tile rows of one frame, converts its labels, computes its weight map and cuts it
into shard samples. Everything is read in bands of about `shard.region_pixels` pixels (rows plus
a small halo, through the lazy readers), so a whole-slide image is tiled in bounded memory and
gives the same tiles as reading it whole.
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unetdist.config import ShardConfig
from unetdist.data import regions
from unetdist.data.inputs import Pair
from unetdist.data.labels import margin, to_classes, to_instances, weight_map
from unetdist.data.normalize import MAX_PIXELS, PERCENTILE_GRID, image_percentiles
from unetdist.data.readers import ImageSource
from unetdist.data.regions import Layout
from unetdist.data.foreground import foreground_mask
from unetdist.data.tiling import Band, bands, iter_band_tiles, tile_grid, tile_starts

SAMPLE_PIXELS = 65536  # per frame and channel, for percentiles of non-integer data


@dataclass(frozen=True)
class PairSurvey:
    """What the first pass learned about one pair."""

    frames: int
    channels: int
    height: int
    width: int
    dtype: str
    class_pixels: np.ndarray  # frames x num_classes
    foreground: list[np.ndarray]  # per frame: foreground fraction of each tile (grid order, valid part)
    axes: str = ""
    pixel_size: dict[str, tuple[float, str]] = field(default_factory=dict)
    background: list[np.ndarray] | None = None  # per frame: tiles a low-res view shows as background only
    percentiles: list[list[list[float]]] = field(default_factory=list)  # per frame, per channel: at PERCENTILE_GRID


@dataclass(frozen=True)
class FrameTask:
    """One band of tile rows of one frame of one pair, to be cut into the samples of `split`."""

    index: int
    pair: Pair
    frame: int
    frames: int
    split: str
    source: str
    keep: tuple[bool, ...] | None  # per tile of the band in grid order; None keeps all
    band: int = 0
    background: bool = False  # the whole band is background: its image is not read at all


@dataclass(frozen=True)
class FrameResult:
    samples: list[tuple[str, dict[str, bytes]]]
    summary: dict[str, Any] | None  # intensity histogram or pixel sample, per channel (None: image not read)
    class_pixels: np.ndarray


def _open(pair: Pair, axes: str) -> tuple[ImageSource, Layout, ImageSource, Layout]:
    image = regions.source(pair.image, axes)
    layout = regions.image_layout(image)
    label = regions.label_source(pair.label)
    return image, layout, label, regions.label_layout(label, layout, pair.image)


def frame_bands(height: int, width: int, shard: ShardConfig, halo: int = 1) -> list[Band]:
    """The bands a frame is read in: about `shard.region_pixels` pixels each (memory stays bounded)."""
    return bands(height, width, shard.tile, shard.overlap, shard.region_pixels, halo)


def sample_halo(shard: ShardConfig) -> int:
    """Rows read beyond a band's tiles: 1 for boundary classes, the weight map's reach with weight maps."""
    return margin(shard.sigma) + 2 if shard.weight_map else 1


def survey_pair(pair: Pair, shard: ShardConfig, num_classes: int) -> PairSurvey:
    """Header, label checks and per-tile foreground of one pair, band by band, and each whole frame's
    percentiles (never a band's); raises DataError naming the file."""
    image, layout, label, label_lay = _open(pair, shard.axes)
    class_pixels = np.zeros((layout.frames, num_classes), np.int64)
    xs = tile_starts(layout.width, shard.tile, shard.overlap)
    foreground = []
    for t in range(layout.frames):
        per_tile = []
        for band in frame_bands(layout.height, layout.width, shard):
            raw = regions.check_label_rows(regions.read_rows(label, label_lay, t, band.top, band.bottom), pair.label)
            classes = to_classes(raw, pair.label, shard.labels, num_classes)
            own = classes[band.own_top - band.top : band.own_bottom - band.top]
            class_pixels[t] += np.bincount(own.ravel(), minlength=num_classes)[:num_classes]
            fg = classes > 0
            per_tile += [fg[y - band.top : y - band.top + shard.tile, x : x + shard.tile].mean()
                         for y in band.starts for x in xs]
        foreground.append(np.array(per_tile))
    background = None
    if shard.skip_background != "off":
        background = [_background_tiles(image, t, layout, shard) for t in range(layout.frames)]
    percentiles = [frame_percentiles(image, layout, t) for t in range(layout.frames)]
    return PairSurvey(layout.frames, layout.channels, layout.height, layout.width, layout.dtype, class_pixels,
                      foreground, layout.axes, layout.pixel_size, background, percentiles)


def frame_percentiles(image: ImageSource, layout: Layout, frame: int) -> list[list[float]]:
    """Per channel, the percentiles (at `normalize.PERCENTILE_GRID`) of the WHOLE frame, not of a band.

    Read through a lazy frame view: the regions sampled depend only on the frame's shape, so the values
    are those of the frame read whole, in bounded memory for a whole-slide image.
    """
    view = regions.frame_view(image, layout, frame)
    return image_percentiles(view, "CYX", PERCENTILE_GRID, MAX_PIXELS).tolist()


def _background_tiles(image: ImageSource, frame: int, layout: Layout, shard: ShardConfig) -> np.ndarray:
    """Per tile (grid order): whether the frame's low-resolution foreground mask is empty there."""
    mask = foreground_mask(image, frame, shard.skip_background)
    tile = shard.tile
    return np.array([not mask.covers(y, y + tile, x, x + tile)
                     for y, x in tile_grid(layout.height, layout.width, tile, shard.overlap)])


def frame_samples(task: FrameTask, shard: ShardConfig, num_classes: int, weights: np.ndarray | None,
                  seed: int) -> FrameResult:
    """Samples (key, members) of one band of one frame, its intensity summary and class pixel counts."""
    pair = task.pair
    image_src, layout, label_src, label_lay = _open(pair, shard.axes)
    height, width = layout.height, layout.width
    band = frame_bands(height, width, shard, sample_halo(shard))[task.band]
    raw = regions.read_rows(label_src, label_lay, task.frame, band.top, band.bottom)
    classes = to_classes(raw, pair.label, shard.labels, num_classes)
    own = slice(band.own_top - band.top, band.own_bottom - band.top)
    counts = np.bincount(classes[own].ravel(), minlength=num_classes)[:num_classes]
    if task.background:  # nothing to write and no intensities to count: the image is not read
        return FrameResult([], None, counts)
    image = regions.read_rows(image_src, layout, task.frame, band.top, band.bottom)
    weight = None
    if weights is not None:
        instances = to_instances(raw, classes, shard.labels, num_classes)
        weight = weight_map(classes, instances, weights, shard.w0, shard.sigma)
    samples = []
    frame_tag = f"_t{task.frame:05d}" if task.frames > 1 else ""
    cut = (band, height, width, shard.tile, shard.overlap)
    weight_tiles = iter_band_tiles(weight[None], None, *cut) if weight is not None else None
    for number, tile in enumerate(iter_band_tiles(image, classes, *cut)):
        weight_tile = next(weight_tiles) if weight_tiles is not None else None
        if task.keep is not None and not task.keep[number]:
            continue
        members = {"img.npy": npy_bytes(tile.image), "lbl.npy": npy_bytes(tile.label)}
        if weight_tile is not None:
            members["wgt.npy"] = npy_bytes(weight_tile.image[0].astype(np.float16))
        foreground = float((tile.label[: tile.valid_h, : tile.valid_w] > 0).mean())
        meta = {"source": task.source, "source_index": task.index, "y": tile.y, "x": tile.x,
                "valid_h": tile.valid_h, "valid_w": tile.valid_w, "tile": shard.tile, "split": task.split,
                "foreground": round(foreground, 6),
                "crc32": {name: zlib.crc32(data) for name, data in members.items()}}
        if task.frames > 1:
            meta["frame"] = task.frame
        members["json"] = json.dumps(meta, sort_keys=True).encode()
        samples.append((f"s{task.index:06d}{frame_tag}_y{tile.y:05d}_x{tile.x:05d}", members))
    share = max(1, round(SAMPLE_PIXELS * (band.own_bottom - band.own_top) / height))
    summary = intensity_summary(image[:, own], (seed, task.index, task.frame, task.band), share)
    return FrameResult(samples, summary, counts)


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as .npy bytes (lossless, any dtype, no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def exact_histogram(dtype: np.dtype) -> bool:
    """8/16-bit integer data is counted exactly; other dtypes are sampled."""
    return dtype.kind in "ui" and dtype.itemsize <= 2


def intensity_summary(image: np.ndarray, seed_parts: tuple[int, ...], sample: int = SAMPLE_PIXELS) -> dict[str, Any]:
    """Per channel: a full histogram (8/16-bit) or a seeded sample of `sample` pixels."""
    exact = exact_histogram(image.dtype)
    rng = np.random.default_rng(np.random.SeedSequence([p % 2**63 for p in seed_parts]))
    per_channel = []
    for c in range(image.shape[0]):
        flat = image[c].ravel()
        if exact:
            offset = -int(np.iinfo(image.dtype).min)
            bins = 1 << (8 * image.dtype.itemsize)
            shifted = flat if offset == 0 else flat.astype(np.int64) + offset  # unsigned: counted as they are
            per_channel.append(np.bincount(shifted, minlength=bins))
        else:
            take = flat if flat.size <= sample else rng.choice(flat, sample, replace=False)
            per_channel.append(np.asarray(take, np.float64))
    return {"exact": exact, "dtype": str(image.dtype), "channels": per_channel}
