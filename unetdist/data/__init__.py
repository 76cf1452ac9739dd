"""Data: synthetic images, tiling, shard writing and the streaming loaders.

`synth` makes the embedded default dataset, `shards` writes tiled WebDataset shards and their
manifest, `stream` reads them back as per-rank batches, and `default.ensure_dataset` ties the
first two together for a run that starts with no data.
"""

from unetdist.data.default import ensure_dataset
from unetdist.data.manifest import IntensityStats, Manifest, normalize, open_manifest
from unetdist.data.shards import DataError, read_pairs, write_shards
from unetdist.data.stream import batches_per_epoch, train_loader, val_loader
from unetdist.data.synth import generate_dataset

__all__ = [
    "DataError",
    "IntensityStats",
    "Manifest",
    "batches_per_epoch",
    "ensure_dataset",
    "generate_dataset",
    "normalize",
    "open_manifest",
    "read_pairs",
    "train_loader",
    "val_loader",
    "write_shards",
]
