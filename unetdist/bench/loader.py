"""`unetdist bench loader`: can the data pipeline feed the GPUs? Tiles/s per CPU core, ours vs per-file.

Measures the full training pipeline (read shard -> decode -> normalise -> augment -> batch) and
the same work done the common way: one 16-bit PNG per tile image and one PNG per label (a TIFF
per weight map) in a folder, read by a map-style Dataset with a shuffling DataLoader, as
milesial/Pytorch-UNet does. Both get the same tiles (the baseline files are written from the
shards), the same normalisation and the same augmentation functions with the same settings, and
take turns batch by batch, so machine noise hits both. With `--workers 0` (default) everything
runs in the measuring process on one torch thread and the rates are tiles per CPU-second of that
process, i.e. per core, even on a machine busy with other work; with N workers they are tiles per
wall-clock second divided by N.

The target: 8 cores must feed an H100 training 512 x 512 tiles, about 250 tiles/s,
i.e. 31 tiles/s per core, and the pipeline should be at least 2x the per-file baseline.

Entry points for the `bench` command: `add_loader_arguments(parser)` and `run_loader_bench(args)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unetdist.config import AugmentConfig, ShardConfig, SynthConfig
from unetdist.data.console import deprecated_alias, new_parser
from unetdist.data.console import main as run_main

if TYPE_CHECKING:
    from unetdist.data.manifest import IntensityStats, Manifest

# torch, scipy and the loaders are imported when the benchmark runs, so `unetdist --help` stays fast.

log = logging.getLogger(__name__)

TARGET_PER_CORE = 250 / 8  # tiles/s per core so that 8 cores feed one H100 on 512 x 512 tiles

PRESETS: dict[str, AugmentConfig] = {
    "none": AugmentConfig(enabled=False),
    "flips": AugmentConfig(),
    "mixed": AugmentConfig(rotate_p=0.2, scale_p=0.2, elastic_p=0.2, intensity_p=0.15, noise_p=0.1, blur_p=0.1),
    "full": AugmentConfig(rotate_p=1.0, scale_p=1.0, elastic_p=1.0, intensity_p=1.0, noise_p=1.0, blur_p=1.0),
}


def add_loader_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `unetdist bench loader`."""
    parser.add_argument("--root", help="an existing sharded dataset (default: a synthetic one in a temp folder)")
    parser.add_argument("--tile", type=int, default=512, help="tile size of the synthetic dataset")
    parser.add_argument("--count", type=int, default=12, help="synthetic source images")
    deprecated_alias(parser, "--images", "--count", type=int)
    parser.add_argument("--image-size", type=int, default=1024, help="height and width of the synthetic images")
    parser.add_argument("--augment", choices=sorted(PRESETS), default="mixed",
                        help="augmentation settings used by both pipelines (mixed: configs/nuclei.yaml's probabilities)")
    parser.add_argument("--crop", type=int, default=0, help="random crop size (0: whole tiles)")
    parser.add_argument("--no-weight-map", action="store_true", help="no weight maps in the tiles")
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per batch")
    parser.add_argument("--batches", type=int, default=12, help="batches timed per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements of each pipeline")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: in-process, one core)")
    parser.add_argument("--baseline-format", choices=["png", "tif"], default="png", help="per-file image format")
    parser.add_argument("--json", help="also write the results to this JSON file")
    from unetdist.bench.loader_url import add_url_arguments

    add_url_arguments(parser)


class PerFileDataset:
    """The common way: one image file and one label file per tile, decoded per item (a map-style Dataset)."""

    def __init__(self, folder: Path, stats: IntensityStats, augment: AugmentConfig, seed: int) -> None:
        self.images = sorted(folder.glob("img_*"))
        self.labels = sorted(folder.glob("lbl_*"))
        self.weights = sorted(folder.glob("wgt_*"))
        self.stats, self.augment, self.seed = stats, augment, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import tifffile
        import torch
        from PIL import Image

        from unetdist.data.augment import augment_code, intensity, sample_rng, spatial
        from unetdist.data.manifest import normalize

        path = self.images[index]
        with Image.open(self.labels[index]) as lbl:
            label = np.array(lbl)
        if path.suffix == ".png":
            with Image.open(path) as img:
                image = np.array(img)[None]
        else:
            image = tifffile.imread(path)[None]
        weight = tifffile.imread(self.weights[index]) if self.weights else None
        if self.augment.enabled:
            rng = sample_rng(self.seed, 0, 0, 0, index)
            image, label, weight = spatial(rng, self.augment, augment_code(self.seed, 0, 0, 0, index), image, label,
                                           weight)
            image = intensity(rng, self.augment, normalize(image, self.stats))
        else:
            image = normalize(image, self.stats)
        item = {"image": torch.from_numpy(image), "label": torch.from_numpy(label.astype(np.int64))}
        if weight is not None:
            item["weight"] = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
        return item


def write_per_file(manifest: Manifest, out: Path, fmt: str) -> int:
    """Every training tile of the shards as separate files (the baseline's input); returns the count."""
    import tifffile
    from PIL import Image

    from unetdist.data.reader import decode, shard_samples

    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for url in manifest.train_shards:
        for sample in shard_samples(url):
            image, label, weight = decode(sample, manifest.num_classes)
            name = f"{count:06d}"
            if fmt == "png":
                Image.fromarray(image[0]).save(out / f"img_{name}.png")  # 16-bit grayscale, lossless
            else:
                tifffile.imwrite(out / f"img_{name}.tif", image[0])
            Image.fromarray(label).save(out / f"lbl_{name}.png")
            if weight is not None:
                tifffile.imwrite(out / f"wgt_{name}.tif", weight.astype(np.float16))
            count += 1
    return count


def _make_dataset(root: Path, args: argparse.Namespace) -> None:
    from unetdist.data.shards import write_shards
    from unetdist.data.synth import generate_dataset

    size = args.image_size
    pairs = generate_dataset(root / "raw", SynthConfig(images=args.count, height=size, width=size, seed=0))
    shard = ShardConfig(tile=args.tile, val_fraction=0.2, weight_map=not args.no_weight_map, min_shards=4,
                        shard_bytes=64 * 2**20)
    write_shards(pairs, root, shard, num_classes=2)


def _ours(manifest: Manifest, augment: AugmentConfig, args: argparse.Namespace, seed: int) -> Iterator[dict]:
    """The training loader, epoch after epoch, as `unetdist train` runs it on one rank."""
    from unetdist.config import DataConfig, NormalizeConfig
    from unetdist.data.stream import run_loader

    data = DataConfig(batch_size=args.batch_size, workers=args.workers, shuffle_buffer=64, augment=augment,
                      normalize=NormalizeConfig(mode="dataset"))  # what the per-file baseline does too
    yield from run_loader(data, manifest, rank=0, world_size=1, seed=seed, stop_step=10**12)


def _baseline(folder: Path, manifest: Manifest, augment: AugmentConfig, args: argparse.Namespace,
              seed: int) -> Iterator[dict]:
    import torch
    from torch.utils.data import DataLoader

    dataset = PerFileDataset(folder, manifest.stats, augment, seed)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True,
                                             num_samples=(args.batches + 1) * args.batch_size * max(1, args.workers))
    return iter(DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                           prefetch_factor=2 if args.workers else None))


def _interleaved(pipelines: list[Iterator[dict]], count: int, per_core: bool) -> list[float]:
    """Tiles/s of each pipeline over `count` batches, taken in turns, after one warm-up batch each.

    Taking turns batch by batch puts both pipelines under the same machine load. With `per_core`
    (everything runs in this process on one torch thread) the rate is per CPU-second of this
    process, i.e. per core, whatever else the machine is doing; otherwise per wall-clock second.
    """
    clock = time.process_time if per_core else time.perf_counter
    tiles, seconds = [0] * len(pipelines), [0.0] * len(pipelines)
    for batches in pipelines:
        next(batches)
    for _ in range(count):
        for i, batches in enumerate(pipelines):
            start = clock()
            tiles[i] += next(batches)["image"].shape[0]
            seconds[i] += clock() - start
    return [t / s for t, s in zip(tiles, seconds)]


def run_loader_bench(args: argparse.Namespace) -> int:
    """Run the benchmark and print tiles/s per core for both pipelines and their ratio."""
    import torch

    from unetdist.data.manifest import open_manifest

    torch.set_num_threads(1)
    augment = replace(PRESETS[args.augment], crop=args.crop)
    if getattr(args, "write_per_file", None) or getattr(args, "url", None):
        from unetdist.bench.loader_url import run_url_bench, write_per_file_tiles

        if args.write_per_file:
            if not args.root:
                raise SystemExit("--write-per-file needs --root (the local dataset whose tiles to write)")
            return write_per_file_tiles(args.root, args.write_per_file)
        return run_url_bench(args, augment)
    with tempfile.TemporaryDirectory(prefix="unetdist-bench-") as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "shards"
        if not args.root:
            _make_dataset(root, args)
        manifest = open_manifest(root)
        files = write_per_file(manifest, Path(tmp) / "per-file", args.baseline_format)
        cores = max(1, args.workers)
        ours, base, device_side = [], [], []
        for repeat in range(args.repeats):
            pipelines = [_ours(manifest, augment, args, repeat),
                         _baseline(Path(tmp) / "per-file", manifest, augment, args, repeat),
                         _ours(manifest, replace(augment, device="cuda"), args, repeat)]
            rates = _interleaved(pipelines, args.batches, per_core=args.workers == 0)
            ours.append(rates[0] / cores)
            base.append(rates[1] / cores)
            device_side.append(rates[2] / cores)
    result = _summary(args, manifest, augment, files, ours, base)
    # data.augment.device=cuda: the loader only draws the geometry; the device resamples the batch
    result.update(ours_device_side_tiles_per_s_per_core=device_side, ours_device_side_median=statistics.median(device_side))
    print(_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _summary(args: argparse.Namespace, manifest: Manifest, augment: AugmentConfig, files: int, ours: list[float],
             base: list[float]) -> dict[str, Any]:
    ours_med, base_med = statistics.median(ours), statistics.median(base)
    return {"tile": manifest.tile, "crop": augment.crop, "channels": manifest.channels, "dtype": manifest.dtype,
            "weight_maps": manifest.weights, "tiles": files, "batch_size": args.batch_size, "workers": args.workers,
            "clock": "CPU time of the process" if args.workers == 0 else "wall clock / workers",
            "augment_preset": args.augment, "augment": asdict(augment), "baseline_format": args.baseline_format,
            "ours_tiles_per_s_per_core": ours, "baseline_tiles_per_s_per_core": base,
            "ours_median": ours_med, "baseline_median": base_med, "ratio": ours_med / base_med,
            "target_per_core": TARGET_PER_CORE, "cores_to_feed_250_tiles_per_s": 250 / ours_med}


def _table(r: dict[str, Any]) -> str:
    size = r["crop"] or r["tile"]
    lines = [
        f"loader benchmark: {r['tiles']} tiles of {r['channels']} x {r['tile']} x {r['tile']} {r['dtype']}"
        f"{' + weight maps' if r['weight_maps'] else ''}, batches of {r['batch_size']} x {size} x {size}, "
        f"augmentation '{r['augment_preset']}', {r['workers']} worker(s), rates per {r['clock']}",
        f"  ours (tar shards, streaming)      {r['ours_median']:8.1f} tiles/s per core   "
        f"(runs: {', '.join(f'{v:.1f}' for v in r['ours_tiles_per_s_per_core'])})",
        f"  per-file {r['baseline_format']:3s} + map-style Dataset  {r['baseline_median']:8.1f} tiles/s per core   "
        f"(runs: {', '.join(f'{v:.1f}' for v in r['baseline_tiles_per_s_per_core'])})",
        f"  ours, geometry on the device     {r['ours_device_side_median']:8.1f} tiles/s per core   "
        f"(data.augment.device=cuda: the loader's share; the device resamples the batch)",
        f"  ratio {r['ratio']:.2f}x (target >= 2x); {r['cores_to_feed_250_tiles_per_s']:.1f} cores feed 250 tiles/s "
        f"(target <= 8: {r['target_per_core']:.1f} tiles/s per core)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m unetdist.bench.loader`, the same as `unetdist bench loader`."""
    parser = new_parser("python -m unetdist.bench.loader", __doc__.split("\n")[0])
    add_loader_arguments(parser)
    parser.set_defaults(func=run_loader_bench)
    return run_main(parser, argv, lambda args: "unetdist bench loader")


if __name__ == "__main__":
    raise SystemExit(main())
