"""Argument parsing for `unetdist synth` and `unetdist shard`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unetdist.config import ShardConfig, SynthConfig


def _synth(args: argparse.Namespace) -> int:
    from unetdist.data.synth import generate_dataset

    synth = SynthConfig(images=args.images, height=args.height, width=args.width, seed=args.seed, boundary=args.boundary)
    pairs = generate_dataset(Path(args.out), synth)
    print(f"wrote {len(pairs)} image/label pairs to {args.out}")
    return 0


def _shard(args: argparse.Namespace) -> int:
    from unetdist.data.shards import read_pairs, write_shards

    shard = ShardConfig(tile=args.tile, overlap=args.overlap, shard_bytes=args.shard_bytes,
                        val_fraction=args.val_fraction, seed=args.seed)
    pairs = read_pairs(args.images, args.labels)
    manifest = write_shards(pairs, Path(args.out), shard, num_classes=args.num_classes, progress=sys.stderr.isatty())
    print(f"wrote {manifest['train']['samples']} train and {manifest['val']['samples']} validation tiles to {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate synthetic 16-bit fluorescence nuclei images and label masks")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images", type=int, default=SynthConfig.images)
    p.add_argument("--height", type=int, default=SynthConfig.height)
    p.add_argument("--width", type=int, default=SynthConfig.width)
    p.add_argument("--seed", type=int, default=SynthConfig.seed)
    p.add_argument("--boundary", action="store_true", help="3 classes: background, boundary, interior")
    p.set_defaults(func=_synth)

    p = sub.add_parser("shard", help="tile image/label pairs into WebDataset shards with a manifest")
    p.add_argument("--images", required=True, help="glob of images, e.g. 'raw/img_*.tif'")
    p.add_argument("--labels", required=True, help="glob of label masks, matched to images in sorted order")
    p.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--tile", type=int, default=ShardConfig.tile)
    p.add_argument("--overlap", type=int, default=ShardConfig.overlap)
    p.add_argument("--shard-bytes", type=int, default=ShardConfig.shard_bytes)
    p.add_argument("--val-fraction", type=float, default=ShardConfig.val_fraction)
    p.add_argument("--seed", type=int, default=ShardConfig.seed)
    p.set_defaults(func=_shard)
