"""Reading a dataset's manifest.json: shards, sample counts, classes and intensity statistics.

Separate from the loaders so that inference and tools can read a dataset without importing
torch's DataLoader machinery. `unetdist.data.stream` re-exports these names. The normalisation
itself lives in `unetdist.data.normalize` (re-exported here for older imports).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from webdataset.shardlists import expand_urls

from unetdist.config import DataConfig, NormalizeConfig
from unetdist.data.errors import DataError
from unetdist.data.normalize import MODES, IntensityStats, Normalization, grid_columns, normalize
from unetdist.data.remote import is_remote, read_bytes

__all__ = ["FORMAT", "IntensityStats", "Manifest", "normalize", "open_manifest", "validate_manifest"]

log = logging.getLogger(__name__)

FORMAT = "unetdist-shards/1"  # later additions (weight maps, checksums, ...) are optional members and keys


@dataclass
class Manifest:
    """What the loaders need to know about a dataset; shard entries are full paths or URLs."""

    root: str
    train_shards: list[str]
    val_shards: list[str]
    train_samples: int
    val_samples: int
    channels: int
    num_classes: int
    tile: int
    dtype: str
    stats: IntensityStats
    class_frequencies: list[float]
    train_shard_samples: list[int] | None = None  # per shard, when known (None: URLs not in the manifest)
    val_shard_samples: list[int] | None = None
    weights: bool = False  # every sample has a `wgt.npy` weight map
    image_percentiles: tuple[float, ...] = ()  # per-image percentiles stored with every tile (older datasets: none)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def normalization(self, config: NormalizeConfig) -> Normalization:
        """The transform `config` asks for, checked against what the shards store (DataError if it cannot work)."""
        if config.mode == "dataset":
            return Normalization("dataset", self.stats)
        where = f"the dataset in {self.root}"
        if not self.image_percentiles:
            raise DataError(f"{where} stores no per-image percentiles (sharded by an older version); re-run "
                            "`unetdist shard` into a new folder, or set data.normalize.mode=dataset")
        percentiles = (config.low, config.high)
        try:
            grid_columns(self.image_percentiles, percentiles, f"data.normalize.low/high={config.low:g}/{config.high:g}")
        except ValueError as exc:
            raise DataError(str(exc)) from exc
        max_pixels = int(self.raw["image_percentiles"].get("max_pixels", 0)) or None
        return Normalization("percentile", self.stats, percentiles, *([max_pixels] if max_pixels else []))

    def checkpoint_info(self, normalize: NormalizeConfig | None = None) -> dict[str, Any]:
        """Plain values (safe for weights_only loading) that identify the data a run trained on and how its
        images were normalised (`normalize`: the run's data.normalize; None: the ``dataset`` mode)."""
        norm = self.normalization(normalize or NormalizeConfig(mode="dataset"))
        return {"root": self.root, "train_samples": self.train_samples, "val_samples": self.val_samples,
                "train_shards": len(self.train_shards), "val_shards": len(self.val_shards),
                "channels": self.channels, "num_classes": self.num_classes, "tile": self.tile, "dtype": self.dtype,
                "weights": self.weights, "dataset": str(self.raw.get("dataset", {}).get("name", "")),
                "stats": self.stats.to_dict(), "normalization": norm.to_dict()}


def _read_text(location: str, data: DataConfig | None) -> str:
    if is_remote(location):
        try:
            return read_bytes(location, *((data.retries, data.retry_wait) if data else ())).decode()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise DataError(f"cannot read {location}: {exc}") from exc
    return Path(location).read_text()


def _fail(location: str, key: str, problem: str) -> DataError:
    return DataError(f"{location}: {key} {problem}; the manifest is damaged or not unetdist's: re-run `unetdist shard`")


def _number(raw: Any, location: str, key: str, integer: bool = False, low: float = 0) -> float:
    """`raw` as a number >= `low`, or a one-line error naming the file and key."""
    kind = ("an integer" if integer else "a number") + (f" >= {low:g}" if low > -float("inf") else "")
    if isinstance(raw, bool) or not isinstance(raw, int if integer else (int, float)) or not raw >= low:
        raise _fail(location, key, f"must be {kind}, got {raw!r}" if raw is not None else "is missing")
    return raw


def _member(raw: Any, key: str, location: str, kind: type = dict) -> Any:
    parent, _, last = key.rpartition(".")
    value = raw.get(last) if isinstance(raw, dict) else None
    if not isinstance(value, kind):
        raise _fail(location, key, f"must be a {'mapping' if kind is dict else kind.__name__}, got {value!r}"
                    if value is not None else "is missing")
    return value


def _shard_name(name: Any, location: str, key: str) -> str:
    """A shard name is a file name inside data.root: never absolute, a URL, or climbing out with `..`."""
    if not isinstance(name, str) or not name:
        raise _fail(location, key, f"must be a file name, got {name!r}")
    parts = name.replace("\\", "/").split("/")
    if name.startswith("/") or "://" in name or ".." in parts or ":" in parts[0]:
        raise DataError(f"{location}: {key}={name!r} points outside the dataset folder; shard names must be paths "
                        "inside data.root (a dataset that names other files is refused: re-run `unetdist shard`)")
    return name


def validate_manifest(raw: Any, location: str) -> None:
    """Every key the loaders use, with its type, so a damaged manifest fails here in one line, naming the key."""
    if not isinstance(raw, dict):
        raise DataError(f"{location}: must hold a JSON object, got {type(raw).__name__}; re-run `unetdist shard`")
    channels = int(_number(raw.get("channels"), location, "channels", integer=True, low=1))
    _number(raw.get("num_classes"), location, "num_classes", integer=True, low=2)
    _number(raw.get("tile"), location, "tile", integer=True, low=1)
    _member(raw, "dtype", location, str)
    stats = _member(raw, "stats", location)
    for name in ("low", "high", "clipped_mean", "clipped_std"):
        values = _member(stats, f"stats.{name}", location, list)
        if len(values) != channels:
            raise _fail(location, f"stats.{name}", f"has {len(values)} value(s) for {channels} channel(s)")
        for i, value in enumerate(values):
            _number(value, location, f"stats.{name}[{i}]", low=-float("inf"))
    for split in ("train", "val"):
        part = _member(raw, split, location)
        _number(part.get("samples"), location, f"{split}.samples", integer=True)
        for i, shard in enumerate(_member(part, f"{split}.shards", location, list)):
            if not isinstance(shard, dict):
                raise _fail(location, f"{split}.shards[{i}]", f"must be a mapping, got {shard!r}")
            _shard_name(shard.get("name"), location, f"{split}.shards[{i}].name")
            _number(shard.get("samples"), location, f"{split}.shards[{i}].samples", integer=True)
    for i, value in enumerate(_member(raw["train"], "train.class_frequencies", location, list)):
        _number(value, location, f"train.class_frequencies[{i}]")
    if raw.get("image_percentiles") is not None:  # older datasets have none (then only data.normalize.mode=dataset)
        _validate_percentiles(raw, location, channels)
    if raw.get("normalization") is not None:
        _validate_normalization(raw, location)


def _percentile_list(values: Any, location: str, key: str) -> list[float]:
    """A list of percentiles in [0, 100], or a one-line error naming the key."""
    if not isinstance(values, list) or not values:
        raise _fail(location, key, f"must be a non-empty list, got {values!r}" if values is not None else "is missing")
    for i, value in enumerate(values):
        if _number(value, location, f"{key}[{i}]") > 100:
            raise _fail(location, f"{key}[{i}]", f"must be a percentile in [0, 100], got {value!r}")
    return values


def _validate_percentiles(raw: dict[str, Any], location: str, channels: int) -> None:
    """`image_percentiles`: the grid, and per input and frame, per channel one value per grid point."""
    part = _member(raw, "image_percentiles", location)
    grid = _percentile_list(part.get("percentiles"), location, "image_percentiles.percentiles")
    if part.get("max_pixels") is not None:
        _number(part["max_pixels"], location, "image_percentiles.max_pixels", integer=True, low=1)
    images = _member(part, "image_percentiles.images", location, list)
    inputs = raw.get("inputs")
    if isinstance(inputs, list) and len(images) != len(inputs):
        raise _fail(location, "image_percentiles.images", f"has {len(images)} entries for {len(inputs)} input(s)")
    for i, frames in enumerate(images):
        key = f"image_percentiles.images[{i}]"
        if not isinstance(frames, list) or not frames:
            raise _fail(location, key, f"must be a non-empty list of frames, got {frames!r}")
        expected = inputs[i].get("frames") if isinstance(inputs, list) and isinstance(inputs[i], dict) else None
        if isinstance(expected, int) and len(frames) != expected:
            raise _fail(location, key, f"has {len(frames)} frame(s) for an input of {expected}")
        for t, per_channel in enumerate(frames):
            if not isinstance(per_channel, list) or len(per_channel) != channels:
                raise _fail(location, f"{key}[{t}]", f"must hold {channels} channel(s) of percentiles, "
                            f"got {per_channel!r}")
            for c, values in enumerate(per_channel):
                where = f"{key}[{t}][{c}]"
                if not isinstance(values, list) or len(values) != len(grid):
                    raise _fail(location, where, f"must hold {len(grid)} value(s) (one per percentile), got {values!r}")
                for j, value in enumerate(values):
                    _number(value, location, f"{where}[{j}]", low=-float("inf"))


def _validate_normalization(raw: dict[str, Any], location: str) -> None:
    """`normalization` (when present): a known mode; for ``percentile`` a (low, high) pair and max_pixels."""
    part = _member(raw, "normalization", location)
    mode = part.get("mode")
    if mode not in MODES:
        raise _fail(location, "normalization.mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "percentile":
        if part.get("percentiles") is not None:
            pair = _percentile_list(part["percentiles"], location, "normalization.percentiles")
            if len(pair) != 2 or not pair[0] < pair[1]:
                raise _fail(location, "normalization.percentiles", f"must be [low, high] with low < high, got {pair!r}")
        if part.get("max_pixels") is not None:
            _number(part["max_pixels"], location, "normalization.max_pixels", integer=True, low=1)


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if "://" in root else os.path.abspath(os.path.join(root, name))


def _shard_url_name(url: str) -> str:
    """The file name a URL points at (for `pipe:cmd ... path` the last word)."""
    return url.split()[-1].rstrip("/").rsplit("/", 1)[-1]


def _override(urls: str, split: dict[str, Any], what: str) -> tuple[list[str], list[int] | None, int]:
    """Shards from a WebDataset URL spec, with per-shard sample counts from the manifest when names match."""
    expanded = list(expand_urls(urls))
    if not expanded:
        raise DataError(f"data.{what}_urls={urls!r} expands to no URLs")
    counts = {s["name"]: int(s["samples"]) for s in split["shards"]}
    names = [_shard_url_name(u) for u in expanded]
    if all(n in counts for n in names):
        per_shard = [counts[n] for n in names]
        return expanded, per_shard, sum(per_shard)
    log.warning("data.%s_urls names shards not in the manifest; assuming they hold the manifest's %d samples",
                what, split["samples"])
    return expanded, None, int(split["samples"])


def open_manifest(root: str | Path, data: DataConfig | None = None) -> Manifest:
    """Read `root/manifest.json`; non-empty data.train_urls / data.val_urls replace the shard lists."""
    root = str(root)
    location = _join(root, "manifest.json")
    try:
        raw = json.loads(_read_text(location, data))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no dataset in {root}: {location} is missing (make one with `unetdist synth` + "
                                "`unetdist shard`, or set data.generate=true)") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{location} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise DataError(f"{location}: format {found!r} is not {FORMAT!r}; re-run `unetdist shard`")
    validate_manifest(raw, location)
    shards = {s: [_join(root, e["name"]) for e in raw[s]["shards"]] for s in ("train", "val")}
    counts: dict[str, list[int] | None] = {s: [int(e["samples"]) for e in raw[s]["shards"]] for s in ("train", "val")}
    samples = {s: int(raw[s]["samples"]) for s in ("train", "val")}
    for split in ("train", "val"):
        urls = getattr(data, f"{split}_urls", "") if data is not None else ""
        if urls:
            shards[split], counts[split], samples[split] = _override(urls, raw[split], split)
    return Manifest(
        root=root, train_shards=shards["train"], val_shards=shards["val"],
        train_samples=samples["train"], val_samples=samples["val"], channels=int(raw["channels"]),
        num_classes=int(raw["num_classes"]), tile=int(raw["tile"]), dtype=str(raw["dtype"]),
        stats=IntensityStats.from_dict(raw["stats"]), class_frequencies=list(raw["train"]["class_frequencies"]),
        train_shard_samples=counts["train"], val_shard_samples=counts["val"],
        weights=bool((raw.get("weight_map") or {}).get("enabled")),
        image_percentiles=tuple(float(p) for p in (raw.get("image_percentiles") or {}).get("percentiles", ())), raw=raw,
    )
