"""`unetdist bench loader --url URL`: tiles/s of training data read from a server, four ways.

On a cloud cluster the shards sit behind a link with latency. This measures, with the same tiles and
the same decoding/normalisation/augmentation, wall-clock tiles/s of:

- local: the training loader on a local copy of the dataset (downloaded first, or `--root`);
- server: the training loader streaming shards from `--url` (one request per shard, sequential reads);
- server + cache: the same with the node cache warm (`data.cache.dir` filled by a first pass);
- per-file: one HTTP request per tile image and one per label (PNG), as a map-style Dataset reading
  files from a web server does, from `--per-file-url` (default `URL/per-file`, written by
  `--write-per-file DIR` from a local dataset).

The pipelines take turns batch by batch (so machine noise hits all) and the rates are per
wall-clock second. The goals: server >= 5x per-file, server + cache >= 90% of local.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from unetdist.config import AugmentConfig, CacheConfig, DataConfig


def add_url_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `unetdist bench loader` for a dataset on a server."""
    parser.add_argument("--url", help="measure reading the dataset at this http(s) URL (its manifest.json and shards)")
    parser.add_argument("--per-file-url", help="per-tile PNGs for the baseline (default: URL/per-file)")
    parser.add_argument("--write-per-file", metavar="DIR",
                        help="write the per-tile PNGs of --root's training tiles into DIR (to serve them) and exit")


def _stream(root: str, augment: AugmentConfig, args: argparse.Namespace, cache: str = "") -> Iterator[dict]:
    from unetdist.data.stream import open_manifest, run_loader

    data = DataConfig(batch_size=args.batch_size, workers=args.workers, shuffle_buffer=64, augment=augment,
                      cache=CacheConfig(dir=cache))
    manifest = open_manifest(root, data)
    yield from run_loader(data, manifest, rank=0, world_size=1, seed=0, stop_step=10**12)


class PerFileURLDataset:
    """One GET per tile image and one per label, decoded and augmented per item (map-style)."""

    def __init__(self, base: str, count: int, stats: Any, augment: AugmentConfig) -> None:
        self.base, self.count, self.stats, self.augment = base.rstrip("/"), count, stats, augment

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch
        from PIL import Image

        from unetdist.data.augment import augment_code, intensity, sample_rng, spatial
        from unetdist.data.manifest import normalize

        def get(name: str) -> np.ndarray:
            with urllib.request.urlopen(f"{self.base}/{name}", timeout=30) as response:
                return np.array(Image.open(io.BytesIO(response.read())))

        image, label = get(f"img_{index:06d}.png")[None], get(f"lbl_{index:06d}.png")
        if self.augment.enabled:
            rng = sample_rng(0, 0, 0, 0, index)
            image, label, _ = spatial(rng, self.augment, augment_code(0, 0, 0, 0, index), image, label, None)
            out = intensity(rng, self.augment, normalize(image, self.stats))
        else:
            out = normalize(image, self.stats)
        return {"image": torch.from_numpy(np.ascontiguousarray(out)), "label": torch.from_numpy(label.astype(np.int64))}


def _per_file(base: str, manifest: Any, augment: AugmentConfig, args: argparse.Namespace) -> Iterator[dict]:
    import torch
    from torch.utils.data import DataLoader

    dataset = PerFileURLDataset(base, manifest.train_samples, manifest.stats, augment)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=10**9)
    return iter(DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                           prefetch_factor=2 if args.workers else None))


def _download(url: str, out: Path) -> Path:
    """A local copy of the dataset at `url` (manifest and shards), for the local-disk row."""
    from unetdist.data.remote import read_bytes

    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(read_bytes(f"{url.rstrip('/')}/manifest.json"))
    (out / "manifest.json").write_text(json.dumps(manifest))
    for split in ("train", "val"):
        for shard in manifest[split]["shards"]:
            (out / shard["name"]).write_bytes(read_bytes(f"{url.rstrip('/')}/{shard['name']}"))
    return out


def _warm(url: str, cache: str) -> None:
    from unetdist.data.cache import node_cache
    from unetdist.data.remote import ShardOpener
    from unetdist.data.stream import open_manifest

    opener = ShardOpener(cache_dir=cache)
    for shard in open_manifest(url).train_shards:
        node_cache(opener).get(shard)


def run_url_bench(args: argparse.Namespace, augment: AugmentConfig) -> int:
    """Measure the four pipelines and print the table (and JSON with --json)."""
    from unetdist.bench.loader import _interleaved
    from unetdist.data.stream import open_manifest

    url = args.url.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="unetdist-bench-url-") as tmp:
        local = args.root or str(_download(url, Path(tmp) / "local"))
        cache = str(Path(tmp) / "cache")
        _warm(url, cache)
        manifest = open_manifest(url)
        names = ["local", "server", "server + cache", "per-file"]
        rates: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.repeats):
            pipelines = [_stream(local, augment, args), _stream(url, augment, args),
                         _stream(url, augment, args, cache),
                         _per_file(args.per_file_url or f"{url}/per-file", manifest, augment, args)]
            for name, rate in zip(names, _interleaved(pipelines, args.batches, per_core=False)):
                rates[name].append(rate)
        shutil.rmtree(cache, ignore_errors=True)
    result = _summary(args, manifest, augment, rates)
    print(_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _summary(args: argparse.Namespace, manifest: Any, augment: AugmentConfig,
             rates: dict[str, list[float]]) -> dict[str, Any]:
    median = {name: statistics.median(values) for name, values in rates.items()}
    return {"url": args.url, "tile": manifest.tile, "dtype": manifest.dtype, "batch_size": args.batch_size,
            "workers": args.workers, "augment_preset": args.augment, "clock": "wall clock",
            "tiles_per_s": rates, "median": median,
            "server_vs_per_file": median["server"] / median["per-file"],
            "cache_vs_local": median["server + cache"] / median["local"]}


def _table(r: dict[str, Any]) -> str:
    lines = [f"loader benchmark from {r['url']}: {r['tile']} x {r['tile']} {r['dtype']} tiles, batches of "
             f"{r['batch_size']}, augmentation '{r['augment_preset']}', {r['workers']} worker(s), tiles/s wall clock"]
    for name, value in r["median"].items():
        runs = ", ".join(f"{v:.1f}" for v in r["tiles_per_s"][name])
        lines.append(f"  {name:16s} {value:9.1f} tiles/s   (runs: {runs})")
    lines.append(f"  server / per-file {r['server_vs_per_file']:.1f}x (goal >= 5x); "
                 f"server + cache / local {100 * r['cache_vs_local']:.0f}% (goal >= 90%)")
    return "\n".join(lines)


def write_per_file_tiles(root: str, out: str) -> int:
    """`--write-per-file`: the baseline's PNG files, named as `PerFileURLDataset` asks for them."""
    from unetdist.bench.loader import write_per_file
    from unetdist.data.stream import open_manifest

    count = write_per_file(open_manifest(root), Path(out), "png")
    print(f"wrote {count} tiles as PNG pairs to {out}")
    return 0

