"""Making sure the configured dataset exists, generating the synthetic default or fetching a real one once.

`unetdist train` on a fresh checkout must work with nothing prepared, and under torchrun every
rank calls this at the same time. So the dataset is built in a temporary folder beside `root`
and renamed into place (a rename is atomic on one filesystem), under an exclusive `flock` on
`<root>.lock`: the first process builds it, the others wait on the lock and then find it complete.
flock works across processes of one machine and on shared filesystems that support it (NFS v4,
Lustre mounted with `flock`); on others, build the dataset once before launching.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path

from unetdist.config import DataConfig
from unetdist.data.errors import DataError
from unetdist.data.fetch import get_dataset, prepare
from unetdist.data.shards import write_shards
from unetdist.data.synth import generate_dataset

log = logging.getLogger(__name__)


def ensure_dataset(data: DataConfig, num_classes: int | None = None) -> Path:
    """Return `data.root` once it holds a complete dataset (manifest.json), building it if allowed."""
    root = Path(data.root)
    if (root / "manifest.json").is_file():
        return root
    if not data.generate and not data.fetch:
        raise FileNotFoundError(
            f"no dataset in {root} (manifest.json is missing). Make one with `unetdist synth --out RAW` then "
            f"`unetdist shard --images 'RAW/img_*.tif' --labels 'RAW/lbl_*.tif' --out {root}`, "
            "or set data.generate=true to generate the synthetic default there, "
            "or data.fetch=cellunet-nuclei to download real images"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    lock_path = root.parent / f"{root.name}.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        if (root / "manifest.json").is_file():
            log.info("dataset %s was made by another process", root)
            return root
        _build(data, num_classes, root)
    return root


def _build(data: DataConfig, num_classes: int | None, root: Path) -> None:
    """Generate and shard the synthetic dataset beside `root`, then rename it into place."""
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root} exists but holds no manifest.json; remove it or point data.root elsewhere")
    if data.fetch:
        expected, what = get_dataset(data.fetch).num_classes, f"dataset {data.fetch}"
    else:
        expected, what = (3 if data.synth.boundary else 2), f"synthetic dataset (synth.boundary={data.synth.boundary})"
    if num_classes is not None and num_classes != expected:
        raise DataError(f"the {what} has {expected} classes but model.num_classes={num_classes}")
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s the %s in %s", "fetching and sharding" if data.fetch else "generating", what, root)
    try:
        if data.fetch:
            prepare(data.fetch, tmp, data.shard, cache_dir=data.cache_dir or None)
        else:
            pairs = generate_dataset(tmp / "raw", data.synth)
            write_shards(pairs, tmp, data.shard, expected)
        if root.exists():
            root.rmdir()  # empty (checked above)
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
