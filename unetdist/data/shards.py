"""Writing tiled WebDataset shards and the manifest that describes them.

Shards hold raw tiles, not decoded images, so 16-bit data stays bit-exact: each sample is
`<key>.img.npy` (C x T x T, the source dtype), `<key>.lbl.npy` (T x T uint8) and `<key>.json`
(source, source_index, y, x, valid_h, valid_w, tile). The split into train and validation is by
source image, so no image contributes tiles to both. Each tar is written under a `.tmp` name and
renamed when complete; `manifest.json` is written last (and removed first), so an interrupted
run never leaves a folder that looks like a complete dataset.

Input rule for arrays (.tif/.tiff via tifffile, .npy, 16-bit .png via Pillow):
images are H x W (one channel) or 3-D; a 3-D array is H x W x C when its last axis has at most
4 entries and its first axis more than 4 (e.g. RGB PNG), otherwise C x H x W (e.g. multi-page TIFF).
Labels are H x W integer class indices (a singleton channel axis is dropped).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from unetdist.config import ShardConfig
from unetdist.data.tiling import iter_tiles

log = logging.getLogger(__name__)

PERCENTILES = (0.5, 99.5)
FORMAT = "unetdist-shards/1"
_RECORD = tarfile.RECORDSIZE  # tar files are padded to a multiple of this
_SAMPLE_PIXELS = 65536  # per image and channel, for statistics of non-16-bit data


class DataError(ValueError):
    """Input data a user must fix; the message names the file and what is wrong."""


def read_pairs(images_glob: str, labels_glob: str) -> list[tuple[Path, Path]]:
    """Image and label files from two globs, each sorted, matched by position."""
    images = sorted(glob.glob(images_glob, recursive=True))
    labels = sorted(glob.glob(labels_glob, recursive=True))
    for pattern, found, what in ((images_glob, images, "images"), (labels_glob, labels, "labels")):
        if not found:
            raise DataError(f"no files match the {what} glob {pattern!r} (quote it so the shell does not expand it)")
    if len(images) != len(labels):
        raise DataError(
            f"{len(images)} images match {images_glob!r} but {len(labels)} labels match {labels_glob!r}; "
            "images and labels are matched in sorted order, so the counts must be equal"
        )
    return [(Path(i), Path(l)) for i, l in zip(images, labels)]


def load_array(path: Path) -> np.ndarray:
    """Read .tif/.tiff, .npy or .png without changing its dtype."""
    suffix = path.suffix.lower()
    if suffix not in (".tif", ".tiff", ".npy", ".png"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .tif/.tiff, .npy or .png")
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".png":
            return _read_png(path)
        return tifffile.imread(path)
    except DataError:
        raise
    except Exception as exc:  # tifffile, numpy and Pillow raise many types; name the file
        raise DataError(f"cannot read {path}: {exc}") from exc


def _read_png(path: Path) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError(f"{path}: reading PNG needs Pillow (pip install pillow), or convert to .tif/.npy") from exc
    with Image.open(path) as img:
        return np.array(img)  # mode I;16 gives uint16: never an 8-bit conversion


def as_chw(array: np.ndarray, path: Path) -> np.ndarray:
    """Image as C x H x W following the module's documented rule."""
    if array.dtype.kind not in "uif":
        raise DataError(f"{path}: image dtype {array.dtype} is not a number type")
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        if array.shape[-1] <= 4 < array.shape[0]:
            return np.ascontiguousarray(np.moveaxis(array, -1, 0))
        return array
    raise DataError(f"{path}: image has shape {array.shape}; expected H x W, C x H x W or H x W x C")


def as_label(array: np.ndarray, path: Path, num_classes: int) -> np.ndarray:
    """Label as H x W uint8 class indices, checked against `num_classes`."""
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    elif array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise DataError(f"{path}: label has shape {array.shape}; expected H x W class indices")
    if array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0):
        raise DataError(f"{path}: label holds non-integer values; labels must be class indices")
    if array.dtype.kind not in "uifb":
        raise DataError(f"{path}: label dtype {array.dtype} is not an integer type")
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise DataError(f"{path}: label value {bad:g} is outside [0, num_classes={num_classes}); "
                        "check num_classes or the label files")
    return array.astype(np.uint8)


def split_sources(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of train and validation source images, deterministic from `seed`."""
    if count < 2:
        raise DataError(f"need at least 2 images to split train/validation by image, got {count}")
    n_val = min(count - 1, max(1, round(val_fraction * count)))
    order = np.random.default_rng(seed).permutation(count)
    return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])


class IntensityAccumulator:
    """Per-channel intensity statistics over whole source images (not tiles: no overlap or padding).

    8/16-bit integer data is counted in an exact histogram; other dtypes keep a seeded random
    sample of pixels per image for the percentiles (mean and std are exact sums either way).
    Reported: percentiles 0.5/99.5 (numpy's inverted_cdf rule), mean and std of the raw pixels,
    and clipped_mean/clipped_std of the pixels clipped to the percentiles (what normalize uses).
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.channels = 0  # channels and dtype are fixed by the first image added

    def _start(self, image: np.ndarray) -> None:
        self.channels, self.dtype = image.shape[0], image.dtype
        self.exact = self.dtype.kind in "ui" and self.dtype.itemsize <= 2
        self.offset = -int(np.iinfo(self.dtype).min) if self.exact else 0
        bins = 1 << (8 * self.dtype.itemsize) if self.exact else 0
        self.hist = np.zeros((self.channels, bins), np.int64)
        self.samples: list[list[np.ndarray]] = [[] for _ in range(self.channels)]

    def add(self, image: np.ndarray) -> None:
        """Count one C x H x W source image (all images must share channels and dtype)."""
        if not self.channels:
            self._start(image)
        for c in range(self.channels):
            flat = image[c].ravel()
            if self.exact:
                self.hist[c] += np.bincount(flat.astype(np.int64) + self.offset, minlength=self.hist.shape[1])
            else:
                take = flat if flat.size <= _SAMPLE_PIXELS else self.rng.choice(flat, _SAMPLE_PIXELS, replace=False)
                self.samples[c].append(np.asarray(take, np.float64))

    def result(self) -> dict[str, Any]:
        per_channel = [self._channel(c) for c in range(self.channels)]
        keys = ("low", "high", "mean", "std", "clipped_mean", "clipped_std")
        out: dict[str, Any] = {k: [ch[k] for ch in per_channel] for k in keys}
        out["percentiles"] = list(PERCENTILES)
        out["method"] = "histogram" if self.exact else f"sample of {_SAMPLE_PIXELS} pixels per image"
        return out

    def _channel(self, c: int) -> dict[str, float]:
        if self.exact:
            values = np.arange(self.hist.shape[1], dtype=np.float64) - self.offset
            weights = self.hist[c].astype(np.float64)
        else:
            values = np.sort(np.concatenate(self.samples[c]))
            weights = np.ones_like(values)
        total = weights.sum()
        cum = np.cumsum(weights)
        low, high = (float(values[np.searchsorted(cum, p / 100 * total, side="left")]) for p in PERCENTILES)
        clipped = np.clip(values, low, high)
        mean, cmean = (float((v * weights).sum() / total) for v in (values, clipped))
        std = float(np.sqrt(((values - mean) ** 2 * weights).sum() / total))
        cstd = float(np.sqrt(((clipped - cmean) ** 2 * weights).sum() / total))
        return {"low": low, "high": high, "mean": mean, "std": std, "clipped_mean": cmean, "clipped_std": cstd}


class ShardSink:
    """Writes `<prefix>-NNNNNN.tar` files of at most `max_bytes` (unless one sample is larger).

    Each tar is written as `<name>.tmp` and renamed when closed; members have fixed owner and
    mtime so the same input gives byte-identical shards.
    """

    def __init__(self, out_dir: Path, prefix: str, max_bytes: int) -> None:
        self.out_dir, self.prefix, self.max_bytes = out_dir, prefix, max_bytes
        self.shards: list[dict[str, Any]] = []  # {"name", "samples"} of completed shards
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(512 + -(-len(data) // 512) * 512 for data in members.values())
        if self._tar is not None and _tar_size(self._tar.offset + size) > self.max_bytes:
            self._finish()
        if self._tar is None:
            self._tmp = self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar.tmp"
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        """Delete the shard in progress and the shards this sink completed."""
        if self._tar is not None:
            self._tar.close()
        for path in [self._tmp] + [self.out_dir / s["name"] for s in self.shards]:
            if path is not None:
                path.unlink(missing_ok=True)
        self._tar, self._tmp, self.shards = None, None, []

    def _finish(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        final = self._tmp.with_suffix("")  # drop ".tmp"
        _fsync(self._tmp)
        os.replace(self._tmp, final)
        self.shards.append({"name": final.name, "samples": self._count})
        self._tar, self._tmp, self._count = None, None, 0


def _tar_size(offset: int) -> int:
    """Bytes on disk of a tar whose members end at `offset` (end blocks, record padding)."""
    return -(-(offset + 1024) // _RECORD) * _RECORD


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _source_name(path: Path, out_dir: Path) -> str:
    """Path of a source image relative to the dataset folder when inside it (survives a rename)."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(os.path.abspath(out_dir)))
    except ValueError:
        return str(path)


def _load_pair(pair: tuple[Path, Path], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    image_path, label_path = Path(pair[0]), Path(pair[1])
    image = as_chw(load_array(image_path), image_path)
    label = as_label(load_array(label_path), label_path, num_classes)
    if image.shape[-2:] != label.shape:
        raise DataError(f"{image_path} is {image.shape[-2]}x{image.shape[-1]} (H x W, shape {image.shape}) "
                        f"but its label {label_path} is {label.shape[0]}x{label.shape[1]}")
    return image, label


class _Layout:
    """The channel count and dtype fixed by the first image; later images must agree."""

    def __init__(self) -> None:
        self.channels: int | None = None
        self.dtype: np.dtype | None = None
        self.first: Path | None = None

    def check(self, image: np.ndarray, path: Path) -> None:
        if self.channels is None:
            self.channels, self.dtype, self.first = image.shape[0], image.dtype, path
        elif (image.shape[0], image.dtype) != (self.channels, self.dtype):
            raise DataError(f"{path} has {image.shape[0]} channel(s) of {image.dtype} but {self.first} has "
                            f"{self.channels} of {self.dtype}; all images of a dataset must agree")


def _write_split(split: str, indices: Iterable[int], pairs: list[tuple[Path, Path]], out_dir: Path,
                 shard: ShardConfig, num_classes: int, layout: _Layout, stats: IntensityAccumulator | None,
                 progress: bool) -> dict[str, Any]:
    sink = ShardSink(out_dir, split, shard.shard_bytes)
    class_pixels = np.zeros(num_classes, np.int64)
    sources: list[str] = []
    try:
        for index in indices:
            image, label = _load_pair(pairs[index], num_classes)
            layout.check(image, Path(pairs[index][0]))
            if stats is not None:
                stats.add(image)
            class_pixels += np.bincount(label.ravel(), minlength=num_classes)[:num_classes]
            source = _source_name(Path(pairs[index][0]), out_dir)
            sources.append(source)
            for tile in iter_tiles(image, label, shard.tile, shard.overlap):
                meta = {"source": source, "source_index": index, "y": tile.y, "x": tile.x,
                        "valid_h": tile.valid_h, "valid_w": tile.valid_w, "tile": shard.tile, "split": split}
                sink.add(f"s{index:06d}_y{tile.y:05d}_x{tile.x:05d}", {
                    "img.npy": _npy_bytes(tile.image), "lbl.npy": _npy_bytes(tile.label),
                    "json": json.dumps(meta, sort_keys=True).encode()})
            (log.info if progress else log.debug)("%s: %s -> %s shards", split, source, len(sink.shards) + 1)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    total = int(class_pixels.sum())
    return {"shards": sink.shards, "samples": sum(s["samples"] for s in sink.shards), "sources": sources,
            "class_pixels": class_pixels.tolist(),
            "class_frequencies": (class_pixels / max(total, 1)).tolist()}


def _remove_previous(out_dir: Path) -> None:
    """Drop an older manifest first (so a crash cannot pair it with new shards), then old shards."""
    (out_dir / "manifest.json").unlink(missing_ok=True)
    for pattern in ("train-*.tar", "val-*.tar", "train-*.tar.tmp", "val-*.tar.tmp"):
        for path in out_dir.glob(pattern):
            path.unlink()


def write_shards(pairs: list[tuple[Path, Path]], out_dir: Path, shard: ShardConfig, num_classes: int,
                 progress: bool = False) -> dict[str, Any]:
    """Tile `pairs` into train/val WebDataset shards in `out_dir` and write manifest.json.

    Returns the manifest (also written to `out_dir/manifest.json`, last).
    """
    if not pairs:
        raise DataError("no image/label pairs to shard (empty input)")
    if not 2 <= num_classes <= 256:
        raise DataError(f"num_classes must be in [2, 256] (labels are stored as uint8), got {num_classes}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous(out_dir)
    train_idx, val_idx = split_sources(len(pairs), shard.val_fraction, shard.seed)
    layout = _Layout()
    stats = IntensityAccumulator(shard.seed)
    train = _write_split("train", train_idx, pairs, out_dir, shard, num_classes, layout, stats, progress)
    try:
        val = _write_split("val", val_idx, pairs, out_dir, shard, num_classes, layout, None, progress)
    except BaseException:
        for s in train["shards"]:
            (out_dir / s["name"]).unlink(missing_ok=True)
        raise
    manifest = {
        "format": FORMAT, "tile": shard.tile, "overlap": shard.overlap, "channels": layout.channels,
        "dtype": str(layout.dtype), "num_classes": num_classes, "val_fraction": shard.val_fraction,
        "seed": shard.seed, "stats": stats.result(), "train": train, "val": val,
    }
    tmp = out_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    _fsync(tmp)
    os.replace(tmp, out_dir / "manifest.json")
    log.info("wrote %d train tiles in %d shards and %d val tiles in %d shards to %s", train["samples"],
             len(train["shards"]), val["samples"], len(val["shards"]), out_dir)
    return manifest
