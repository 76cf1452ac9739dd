"""Making sure the configured dataset exists, generating the synthetic default or fetching a real one once.

`unetdist train` on a fresh checkout must work with nothing prepared. But a typo in `data.root`
must not quietly train on synthetic data: `data.generate` from a config file only generates into
the shipped roots (`SHIPPED_ROOTS`); elsewhere it needs `data.generate=true` on the command line.
A URL root is never generated into or fetched to; it must hold a dataset.

Under torchrun every
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
from unetdist.data.remote import is_remote
from unetdist.data.shards import write_shards
from unetdist.data.synth import generate_dataset

log = logging.getLogger(__name__)

SHIPPED_ROOTS = ("data/synth-default", "data/synth-512")  # the roots of configs/default.yaml and gpu-8x.yaml


def _no_dataset(root: str, why: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"no dataset in {root} (manifest.json is missing{why}). Check data.root, or make one with "
        f"`unetdist synth --out RAW` then `unetdist shard --images 'RAW/img_*.tif' --labels 'RAW/lbl_*.tif' "
        f"--out {root}`, or pass data.generate=true on the command line to generate the synthetic default there, "
        "or data.fetch=cellunet-nuclei to download real images")


def may_generate(data: DataConfig) -> bool:
    """data.generate applies: asked on the command line, or the root is one of the shipped ones."""
    if not data.generate:
        return False
    shipped = {os.path.abspath(r) for r in SHIPPED_ROOTS}
    return data.generate_asked or os.path.abspath(data.root) in shipped


def ensure_dataset(data: DataConfig, num_classes: int | None = None) -> Path | str:
    """Return `data.root` once it holds a complete dataset (manifest.json), building it if allowed.

    A URL root is returned as it is (its manifest is read, with retries, by `open_manifest`).
    """
    if is_remote(data.root):
        return data.root
    root = Path(data.root)
    if (root / "manifest.json").is_file():
        return root
    if data.generate and not may_generate(data):
        raise _no_dataset(str(root), "; data.generate from a config file only generates into the shipped roots "
                          f"{', '.join(SHIPPED_ROOTS)}")
    if not data.generate and not data.fetch:
        raise _no_dataset(str(root), "")
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
        raise DataError(f"{root} holds files but no manifest.json, so it is not a dataset and nothing is generated "
                        "into it; point data.root at a dataset, or at a new folder to generate one there")
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
