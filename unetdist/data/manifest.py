"""Reading a dataset's manifest.json, and the intensity normalisation it defines.

Separate from the loaders so that inference and tools can normalise images the way training
did without importing torch's DataLoader machinery. `unetdist.data.stream` re-exports these names.

Normalisation: clip each channel to its train-split 0.5/99.5 percentiles, then subtract the mean
and divide by the std of the clipped train pixels. Clipping first keeps hot pixels and saturated
spots from dominating the scale, and z-scoring after it gives the network inputs of unit scale.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from webdataset.shardlists import expand_urls

from unetdist.config import DataConfig
from unetdist.data.errors import DataError
from unetdist.data.remote import is_remote, read_bytes

log = logging.getLogger(__name__)

FORMAT = "unetdist-shards/1"  # later additions (weight maps, checksums, ...) are optional members and keys


@dataclass(frozen=True)
class IntensityStats:
    """Per-channel train-split statistics used by `normalize`."""

    low: tuple[float, ...]
    high: tuple[float, ...]
    clipped_mean: tuple[float, ...]
    clipped_std: tuple[float, ...]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> IntensityStats:
        return cls(*(tuple(float(v) for v in raw[k]) for k in ("low", "high", "clipped_mean", "clipped_std")))


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
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def checkpoint_info(self) -> dict[str, Any]:
        """Plain values (safe for weights_only loading) that identify the data a run trained on."""
        return {"root": self.root, "train_samples": self.train_samples, "val_samples": self.val_samples,
                "train_shards": len(self.train_shards), "val_shards": len(self.val_shards),
                "channels": self.channels, "num_classes": self.num_classes, "tile": self.tile, "dtype": self.dtype,
                "weights": self.weights, "dataset": str(self.raw.get("dataset", {}).get("name", "")),
                "stats": {"low": list(self.stats.low), "high": list(self.stats.high),
                          "clipped_mean": list(self.stats.clipped_mean), "clipped_std": list(self.stats.clipped_std)}}


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
        weights=bool((raw.get("weight_map") or {}).get("enabled")), raw=raw,
    )


def normalize(image: np.ndarray, stats: IntensityStats | Mapping[str, Any], out: np.ndarray | None = None) -> np.ndarray:
    """float32 image: per channel, clip to the train percentiles, then z-score with the clipped mean/std.

    `image` is C x H x W or N x C x H x W (channels on axis -3), or H x W for one channel. With
    `out` (float32, the image's shape) the result is written there, e.g. into a batch being assembled.
    """
    if not isinstance(stats, IntensityStats):
        stats = IntensityStats.from_dict(stats)
    channels = len(stats.low)
    shape = (channels, 1, 1) if image.ndim >= 3 else ()
    if image.ndim == 2 and channels != 1:
        raise ValueError(f"an H x W image has one channel but the statistics have {channels}")
    if image.ndim >= 3 and image.shape[-3] != channels:
        raise ValueError(f"image has {image.shape[-3]} channels on axis -3 but the statistics have {channels}")
    low, high, mean, std = (np.asarray(v, np.float32).reshape(shape) for v in
                            (stats.low, stats.high, stats.clipped_mean, stats.clipped_std))
    if out is None:
        out = np.empty(image.shape, np.float32)
    np.clip(image, low, high, out=out)  # computed in float32 (uint16 and float32 promote to float32)
    np.subtract(out, mean, out=out)
    return np.divide(out, np.maximum(std, np.float32(1e-6)), out=out)
