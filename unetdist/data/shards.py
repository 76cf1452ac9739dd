"""Writing tiled WebDataset shards and the manifest that describes them.

Shards hold raw tiles, not decoded images, so 8/12/16-bit data stays bit-exact: each sample is
`<key>.img.npy` (C x T x T, the source dtype), `<key>.lbl.npy` (T x T uint8 classes), with weight
maps `<key>.wgt.npy` (T x T float16), and `<key>.json` (source, source_index, frame for stacks,
y, x, valid_h, valid_w, tile, split, foreground fraction, the CRC-32 of every member so a reader
can tell a damaged sample from a good one). The manifest's `image_percentiles.images[i][t]` holds,
per channel, the percentiles (at `normalize.PERCENTILE_GRID`) of the whole frame t of input i
(measured in the first pass through a lazy view of the frame, never per band), so training
normalises a tile as prediction will normalise the whole image.

Order of work: a first pass reads every label file and image header and checks them (shapes, frames,
channels, dtypes, label values), so bad input stops with an error naming the file before any shard
is written; a second pass tiles the frames band by band (`data.shard.region_pixels`), in worker
processes when the input is large (`samples.frame_samples`), and the main process writes the results
in a fixed order, so the shards are byte-identical whatever the number of processes. The split into
train and validation is by source image, or for stacks by blocks of `frame_block` consecutive
frames, or as an input list says, so no frame contributes tiles to both. Everything is built in a
temporary folder inside the output folder and swapped in only when complete (renames only; the old
manifest goes first and the new one last), so an error never costs the dataset already there and an
interrupted run never leaves a folder that looks like a complete dataset.

Empty tiles: training tiles whose foreground fraction (of the part inside the image) is below
`min_foreground` are kept with probability `empty_keep` (seeded per tile): 0 rejects them, 0.25
down-weights them 4x in the sampling. Validation keeps every tile, so its metrics are unbiased.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from unetdist.config import ShardConfig, check_shard
from unetdist.data.errors import DataError
from unetdist.data import regions
from unetdist.data.inputs import Pair, as_pairs, load_array, read_pairs
from unetdist.data.labels import class_weights
from unetdist.data.manifest import FORMAT
from unetdist.data.normalize import MAX_PIXELS, PERCENTILE_GRID
from unetdist.data.samples import FrameResult, FrameTask, PairSurvey, frame_bands, frame_samples, survey_pair
from unetdist.data.sink import ShardSink, fsync
from unetdist.data.stats import PERCENTILES, IntensityAccumulator
from unetdist.data.tiling import tile_starts

__all__ = ["FORMAT", "PERCENTILES", "DataError", "IntensityAccumulator", "as_chw", "load_array", "read_pairs",
           "split_sources", "write_shards"]

log = logging.getLogger(__name__)

PARALLEL_BYTES = 64 * 2**20  # inputs smaller than this are tiled in-process when shard.workers = 0


def as_chw(array: np.ndarray, path: Path) -> np.ndarray:
    """A single image as C x H x W by the `inputs` module's automatic rule for non-TIFF arrays."""
    from unetdist.data.inputs import as_frames, image_axes

    if array.dtype.kind not in "uif":
        raise DataError(f"{path}: image dtype {array.dtype} is not a number type")
    if array.ndim not in (2, 3):
        raise DataError(f"{path}: image has shape {array.shape}; expected H x W, C x H x W or H x W x C")
    return np.ascontiguousarray(as_frames(array, image_axes(path, array.shape, None, "auto"))[0])


def split_sources(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of train and validation units (images or frame blocks), deterministic from `seed`."""
    if count < 2:
        raise DataError(f"need at least 2 images (or frame blocks: data.shard.frame_block) to split "
                        f"train/validation by image, got {count}")
    n_val = min(count - 1, max(1, round(val_fraction * count)))
    order = np.random.default_rng(seed).permutation(count)
    return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])


Unit = tuple[int, range]  # (pair index, frames)


def assign_units(pairs: list[Pair], surveys: list[PairSurvey], shard: ShardConfig) -> dict[str, list[Unit]]:
    """Split units per split: whole images, or blocks of frames; input lists may force a split."""
    forced: dict[str, list[Unit]] = {"train": [], "val": []}
    free: list[Unit] = []
    for index, (pair, survey) in enumerate(zip(pairs, surveys)):
        block = shard.frame_block or survey.frames
        units = [(index, range(a, min(a + block, survey.frames))) for a in range(0, survey.frames, block)]
        (forced[pair.split] if pair.split else free).extend(units)
    if len(free) >= 2:
        train, val = split_sources(len(free), shard.val_fraction, shard.seed)
    elif free and forced["val"]:
        train, val = [0], []
    elif free:
        split_sources(len(free), shard.val_fraction, shard.seed)  # raises the clear error
    else:
        train, val = [], []
    out = {"train": forced["train"] + [free[i] for i in train], "val": forced["val"] + [free[i] for i in val]}
    for split, units in out.items():
        if not units:
            raise DataError(f"no images for the {split} split (an input list may force splits; "
                            "both need at least one image)")
        units.sort(key=lambda u: (u[0], u[1].start))
    return out


def _check_layout(pairs: list[Pair], surveys: list[PairSurvey]) -> None:
    first = surveys[0]
    for pair, survey in zip(pairs, surveys):
        if (survey.channels, survey.dtype) != (first.channels, first.dtype):
            raise DataError(f"{pair.image} has {survey.channels} channel(s) of {survey.dtype} but {pairs[0].image} "
                            f"has {first.channels} of {first.dtype}; all images of a dataset must agree")


def _warn_small(pairs: list[Pair], surveys: list[PairSurvey], tile: int) -> None:
    """Images smaller than a tile are reflect-padded into one: allowed (clear in the manifest), but worth a word."""
    small = [f"{p.image} ({s.height} x {s.width})" for p, s in zip(pairs, surveys) if min(s.height, s.width) < tile]
    if small:
        log.warning("%d image(s) are smaller than the %d px tile and get reflect-padded tiles, e.g. %s; a smaller "
                    "tile (--tile, data.shard.tile) wastes less", len(small), tile, small[0])


def _tasks(split: str, units: list[Unit], pairs: list[Pair], surveys: list[PairSurvey], shard: ShardConfig,
           out_dir: Path) -> list[FrameTask]:
    """One task per band of tile rows of every frame (bands bound the memory of a large frame)."""
    tasks = []
    for index, frames in units:
        survey = surveys[index]
        columns = len(tile_starts(survey.width, shard.tile, shard.overlap))
        frame_bands_ = frame_bands(survey.height, survey.width, shard)
        for t in frames:
            keep_all = _train_keep(survey, index, t, shard) if split == "train" else None
            first = 0
            for number, band in enumerate(frame_bands_):
                count = len(band.starts) * columns
                keep = None if keep_all is None else keep_all[first : first + count]
                background = survey.background is not None and split == "train" and bool(
                    survey.background[t][first : first + count].all())
                first += count
                tasks.append(FrameTask(index=index, pair=pairs[index], frame=t, frames=survey.frames, split=split,
                                       source=_source_name(pairs[index].image, out_dir), keep=keep, band=number,
                                       background=background))
    return tasks


def _train_keep(survey: PairSurvey, index: int, frame: int, shard: ShardConfig) -> tuple[bool, ...] | None:
    """Per tile of a training frame: kept unless empty (by labels, then seeded draws) or background."""
    keep = None
    if shard.min_foreground > 0:
        fg = survey.foreground[frame]
        draws = np.random.default_rng(np.random.SeedSequence([shard.seed, index, frame, 0xE5])).random(fg.size)
        keep = (fg >= shard.min_foreground) | (draws < shard.empty_keep)
    if survey.background is not None:
        keep = ~survey.background[frame] if keep is None else keep & ~survey.background[frame]
    return None if keep is None else tuple(bool(k) for k in keep)


def _source_name(path: Path, out_dir: Path) -> str:
    """Path of a source image relative to the dataset folder when inside it (survives a rename)."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(os.path.abspath(out_dir)))
    except ValueError:
        return str(path)


def _call(job: tuple) -> Any:
    return job[0](*job[1:])


@contextlib.contextmanager
def _mapper(workers: int) -> Iterator[Callable[[Iterable[tuple]], Iterator[Any]]]:
    """An ordered map over jobs (function, *args): in-process, or a pool of `workers` processes.

    Forked where the platform can (as torch's DataLoader does: no re-imports, fast start; the
    workers only run numpy/scipy code), spawned elsewhere. At most two jobs per worker are in
    flight (`Pool.imap` would run ahead and queue every band's tiles in memory when writing is slower).
    """
    if workers <= 1:
        yield lambda jobs: map(_call, jobs)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers, initializer=regions.close_all)

    def bounded(jobs: Iterable[tuple]) -> Iterator[Any]:
        pending: collections.deque = collections.deque()
        for job in jobs:
            pending.append(pool.apply_async(_call, (job,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    try:
        yield bounded
    finally:
        pool.terminate()
        pool.join()


@contextlib.contextmanager
def _closing_images() -> Iterator[None]:
    """Close the image files kept open while sharding, however it ends."""
    try:
        yield
    finally:
        regions.close_all()


def _workers(shard: ShardConfig, pairs: list[Pair]) -> int:
    if shard.workers:
        return shard.workers
    total = sum(p.image.stat().st_size for p in pairs if p.image.exists())
    return (os.cpu_count() or 1) if total > PARALLEL_BYTES else 1


def _swap_in(build: Path, out_dir: Path) -> None:
    """Replace the dataset in `out_dir` by the complete one in `build`: only renames, no pixel is read.

    The old manifest goes first (so a crash cannot pair it with new shards), then the old shards,
    then the new shards move in and the new manifest last. Other files in `out_dir` are left alone.
    """
    (out_dir / "manifest.json").unlink(missing_ok=True)
    for pattern in ("train-*.tar", "val-*.tar", "train-*.tar.tmp", "val-*.tar.tmp"):
        for path in out_dir.glob(pattern):
            path.unlink()
    for path in sorted(build.glob("*.tar")):
        os.replace(path, out_dir / path.name)
    os.replace(build / "manifest.json", out_dir / "manifest.json")


def write_shards(pairs: list[Pair] | list[tuple[Path, Path]], out_dir: Path, shard: ShardConfig, num_classes: int,
                 progress: bool = True, dataset: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tile `pairs` into train/val WebDataset shards in `out_dir` and write manifest.json.

    `dataset` (name, source, licence, ...) is recorded in the manifest as given. Returns the
    manifest (also written to `out_dir/manifest.json`, last).
    """
    check_shard(shard)
    pairs = as_pairs(pairs)
    if not pairs:
        raise DataError("no image/label pairs to shard (empty input)")
    if not 2 <= num_classes <= 256:
        raise DataError(f"num_classes must be in [2, 256] (labels are stored as uint8), got {num_classes}")
    out_dir = Path(out_dir)
    with _mapper(_workers(shard, pairs)) as mapper, _closing_images():
        surveys = list(mapper((survey_pair, p, shard, num_classes) for p in pairs))
        _check_layout(pairs, surveys)
        _warn_small(pairs, surveys, shard.tile)
        units = assign_units(pairs, surveys, shard)
        tasks = {s: _tasks(s, units[s], pairs, surveys, shard, out_dir) for s in ("train", "val")}
        train_pixels = sum(surveys[i].class_pixels[t] for i, frames in units["train"] for t in frames)
        weights = class_weights(train_pixels, shard.class_balance) if shard.weight_map else None
        out_dir.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(prefix=".unetdist-shard-", dir=out_dir))  # same file system: renames
        try:
            jobs = [(frame_samples, task, shard, num_classes, weights, shard.seed) for s in ("train", "val")
                    for task in tasks[s]]
            results = _progress(mapper(jobs), len(jobs), progress)
            splits = _write_splits(results, tasks, build, shard, units, pairs, surveys, out_dir)
            manifest = _manifest(shard, num_classes, surveys, pairs, splits, weights, dataset)
            _check_output(manifest, pairs, surveys, shard)
            tmp = build / "manifest.json.tmp"
            tmp.write_text(json.dumps(manifest, indent=1))
            fsync(tmp)
            os.replace(tmp, build / "manifest.json")
            _swap_in(build, out_dir)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    log.info("wrote %d train tiles in %d shards and %d val tiles in %d shards to %s", manifest["train"]["samples"],
             len(manifest["train"]["shards"]), manifest["val"]["samples"], len(manifest["val"]["shards"]), out_dir)
    return manifest


def _manifest(shard: ShardConfig, num_classes: int, surveys: list[PairSurvey], pairs: list[Pair],
              splits: dict[str, Any], weights: np.ndarray | None, dataset: dict[str, Any] | None) -> dict[str, Any]:
    splits = dict(splits)
    stats = splits.pop("stats")
    # [input][frame]: C x len(grid), of whole frames (measured by survey_pair, never per band)
    percentiles = {"percentiles": list(PERCENTILE_GRID), "max_pixels": MAX_PIXELS,
                   "images": [s.percentiles for s in surveys]}
    return {
        "format": FORMAT, "tile": shard.tile, "overlap": shard.overlap, "channels": surveys[0].channels,
        "dtype": surveys[0].dtype, "num_classes": num_classes, "val_fraction": shard.val_fraction,
        "seed": shard.seed, "stats": stats, **splits,
        "tile_shape": [surveys[0].channels, shard.tile, shard.tile], "label_dtype": "uint8",
        "axes": shard.axes, "labels": shard.labels, "frame_block": shard.frame_block,
        "filter": {"min_foreground": shard.min_foreground, "empty_keep": shard.empty_keep},
        "weight_map": {"enabled": shard.weight_map, "w0": shard.w0, "sigma": shard.sigma,
                       "class_balance": shard.class_balance, "dtype": "float16",
                       "class_weights": None if weights is None else weights.tolist()},
        "checksum": "crc32",
        "image_percentiles": percentiles,
        "inputs": [{"image": str(p.image), "label": str(p.label), "frames": s.frames, "channels": s.channels,
                    "height": s.height, "width": s.width, "axes": s.axes,
                    "pixel_size": {a: list(v) for a, v in s.pixel_size.items()}} for p, s in zip(pairs, surveys)],
        "pixel_size": _common_pixel_size(surveys),
        "dataset": dataset or {},
    }


def _check_output(manifest: dict[str, Any], pairs: list[Pair], surveys: list[PairSurvey], shard: ShardConfig) -> None:
    """0 training tiles cannot train (an error, before the old dataset is replaced)."""
    if manifest["train"]["samples"] == 0:
        raise DataError(f"no training tiles: all {manifest['train']['rejected_empty']} were rejected as empty "
                        f"(min_foreground={shard.min_foreground}, empty_keep={shard.empty_keep}); lower "
                        "--min-foreground or raise --empty-keep")


def _common_pixel_size(surveys: list[PairSurvey]) -> dict[str, list] | None:
    """The images' physical pixel size when all agree (what a model trained on them expects), else None."""
    sizes = [{a: list(v) for a, v in s.pixel_size.items()} for s in surveys]
    return sizes[0] if sizes[0] and all(size == sizes[0] for size in sizes) else None


def _progress(results: Iterable[FrameResult], total: int, show: bool) -> Iterable[FrameResult]:
    from unetdist.data.progress import track

    return track(results, total, "shard", "band", enabled=show)


def _band_tiles(task: FrameTask, survey: PairSurvey, shard: ShardConfig) -> int:
    band = frame_bands(survey.height, survey.width, shard)[task.band]
    return len(band.starts) * len(tile_starts(survey.width, shard.tile, shard.overlap))


def _write_splits(results: Iterable[FrameResult], tasks: dict[str, list[FrameTask]], build: Path,
                  shard: ShardConfig, units: dict[str, list[Unit]], pairs: list[Pair],
                  surveys: list[PairSurvey], out_dir: Path) -> dict[str, Any]:
    """Consume the band results in task order into one sink per split in `build`; delete them on failure.

    Source names are relative to `out_dir`, the dataset's final folder.
    """
    expected = {s: sum(sum(t.keep) if t.keep is not None else _band_tiles(t, surveys[t.index], shard)
                       for t in tasks[s]) for s in tasks}
    sinks = {s: ShardSink(build, s, shard.shard_bytes,
                          math.ceil(expected[s] / shard.min_shards) if shard.min_shards > 1 else None) for s in tasks}
    stats = IntensityAccumulator(shard.seed)
    pixels = {s: np.zeros(surveys[0].class_pixels.shape[1], np.int64) for s in tasks}
    order = [(s, t) for s in ("train", "val") for t in tasks[s]]
    try:
        for (split, task), result in zip(order, results, strict=True):
            if split == "train" and result.summary is not None:
                stats.add_summary(result.summary)
            pixels[split] += result.class_pixels
            for key, members in result.samples:
                sinks[split].add(key, members)
        for sink in sinks.values():
            sink.close()
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    out: dict[str, Any] = {"stats": stats.result()}
    for split, sink in sinks.items():
        total = int(pixels[split].sum())
        sources = sorted({_source_name(pairs[i].image, out_dir) for i, _ in units[split]})
        out[split] = {
            "shards": sink.shards, "samples": sum(s["samples"] for s in sink.shards), "sources": sources,
            "units": [{"source_index": i, "frames": [r.start, r.stop]} for i, r in units[split]],
            "rejected_empty": sum(_band_tiles(t, surveys[t.index], shard) for t in tasks[split]) - expected[split],
            "class_pixels": pixels[split].tolist(),
            "class_frequencies": (pixels[split] / max(total, 1)).tolist(),
        }
    return out
