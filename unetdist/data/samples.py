"""The per-file work of shard writing, run in parallel: survey a pair, and turn one frame into samples.

Two passes, both pure functions of their arguments so that worker processes give the same bytes
as the main process: `survey_pair` reads a pair's image header and its labels, checks them and
measures the foreground of every tile (all before any shard is written); `frame_samples` reads
one frame, converts its labels, computes its weight map and cuts it into shard samples.
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from unetdist.config import ShardConfig
from unetdist.data.inputs import Pair, frame_count, read_image, read_label
from unetdist.data.labels import to_classes, to_instances, weight_map
from unetdist.data.normalize import MAX_PIXELS, PERCENTILE_GRID, image_percentiles
from unetdist.data.tiling import iter_tiles, tile_grid

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


@dataclass(frozen=True)
class FrameTask:
    """One frame of one pair, to be cut into the samples of `split`."""

    index: int
    pair: Pair
    frame: int
    frames: int
    split: str
    source: str
    keep: tuple[bool, ...] | None  # per tile in grid order; None keeps all


@dataclass(frozen=True)
class FrameResult:
    samples: list[tuple[str, dict[str, bytes]]]
    summary: dict[str, Any]  # intensity histogram or pixel sample, per channel
    class_pixels: np.ndarray
    percentiles: list[list[float]]  # per channel, the whole frame's percentiles at normalize.PERCENTILE_GRID


@lru_cache(maxsize=1)
def _image(path: Path, axes: str, mtime: float) -> np.ndarray:
    """The whole image file (T x C x H x W), cached so consecutive frames of a stack read it once."""
    return read_image(path, axes)


def _label_frames(pair: Pair, frames: int, height: int, width: int) -> np.ndarray:
    return read_label(pair.label, frames, height, width, pair.image)


def survey_pair(pair: Pair, shard: ShardConfig, num_classes: int) -> PairSurvey:
    """Header, label checks and per-tile foreground of one pair; raises DataError naming the file."""
    frames, channels, height, width, dtype = frame_count(pair, shard.axes)
    labels = _label_frames(pair, frames, height, width)
    class_pixels = np.zeros((frames, num_classes), np.int64)
    grid = tile_grid(height, width, shard.tile, shard.overlap)
    foreground = []
    for t in range(frames):
        classes = to_classes(np.asarray(labels[t]), pair.label, shard.labels, num_classes)
        class_pixels[t] = np.bincount(classes.ravel(), minlength=num_classes)[:num_classes]
        fg = classes > 0
        foreground.append(np.array([fg[y : y + shard.tile, x : x + shard.tile].mean() for y, x in grid]))
    return PairSurvey(frames, channels, height, width, str(dtype), class_pixels, foreground)


def frame_samples(task: FrameTask, shard: ShardConfig, num_classes: int, weights: np.ndarray | None,
                  seed: int) -> FrameResult:
    """Samples (key, members) of one frame, its intensity summary and class pixel counts."""
    pair = task.pair
    stack = _image(pair.image, shard.axes, pair.image.stat().st_mtime)
    image = np.ascontiguousarray(stack[task.frame])
    raw = np.asarray(_label_frames(pair, task.frames, image.shape[-2], image.shape[-1])[task.frame])
    classes = to_classes(raw, pair.label, shard.labels, num_classes)
    weight = None
    if weights is not None:
        instances = to_instances(raw, classes, shard.labels, num_classes)
        weight = weight_map(classes, instances, weights, shard.w0, shard.sigma)
    samples = []
    frame_tag = f"_t{task.frame:05d}" if task.frames > 1 else ""
    weight_tiles = iter_tiles(weight[None], None, shard.tile, shard.overlap) if weight is not None else None
    for number, tile in enumerate(iter_tiles(image, classes, shard.tile, shard.overlap)):
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
    counts = np.bincount(classes.ravel(), minlength=num_classes)[:num_classes]
    percentiles = image_percentiles(image, "CYX", PERCENTILE_GRID, MAX_PIXELS).tolist()  # of the whole frame
    return FrameResult(samples, intensity_summary(image, (seed, task.index, task.frame)), counts, percentiles)


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as .npy bytes (lossless, any dtype, no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def exact_histogram(dtype: np.dtype) -> bool:
    """8/16-bit integer data is counted exactly; other dtypes are sampled."""
    return dtype.kind in "ui" and dtype.itemsize <= 2


def intensity_summary(image: np.ndarray, seed_parts: tuple[int, ...]) -> dict[str, Any]:
    """Per channel: a full histogram (8/16-bit) or a seeded sample of pixels, plus exact sums."""
    exact = exact_histogram(image.dtype)
    rng = np.random.default_rng(np.random.SeedSequence([p % 2**63 for p in seed_parts]))
    per_channel = []
    for c in range(image.shape[0]):
        flat = image[c].ravel()
        if exact:
            offset = -int(np.iinfo(image.dtype).min)
            bins = 1 << (8 * image.dtype.itemsize)
            per_channel.append(np.bincount(flat.astype(np.int64) + offset, minlength=bins))
        else:
            take = flat if flat.size <= SAMPLE_PIXELS else rng.choice(flat, SAMPLE_PIXELS, replace=False)
            per_channel.append(np.asarray(take, np.float64))
    return {"exact": exact, "dtype": str(image.dtype), "channels": per_channel}
