"""Data: reading the user's images, tiling them into shards, fetching a real dataset, streaming batches.

`inputs` reads image/label files (globs or CSV/YAML lists, TIFF stacks, PNG, .npy) and `labels`
turns labels into classes, instances and U-Net weight maps; `shards` writes tiled WebDataset
shards and their manifest (with `samples` doing the per-file work in parallel); `stream` reads
them back as per-rank batches (one loader for a whole training run: `run_loader`; `reader` survives
damaged shards, `augment` transforms samples); `fetch` downloads the real nuclei images; `synth`
makes the embedded default dataset and `default.ensure_dataset` builds either when a run starts
with no data.
"""

from unetdist.data.default import ensure_dataset
from unetdist.data.errors import DataError
from unetdist.data.inputs import Pair, read_list, read_pairs
from unetdist.data.manifest import IntensityStats, Manifest, normalize, open_manifest
from unetdist.data.shards import write_shards
from unetdist.data.stream import batches_per_epoch, run_loader, train_loader, val_loader
from unetdist.data.synth import generate_dataset

__all__ = [
    "DataError",
    "IntensityStats",
    "Manifest",
    "Pair",
    "batches_per_epoch",
    "ensure_dataset",
    "generate_dataset",
    "normalize",
    "open_manifest",
    "read_list",
    "read_pairs",
    "run_loader",
    "train_loader",
    "val_loader",
    "write_shards",
]
