"""Atomic checkpoint files, keep-last-k, and finding the newest complete one to resume from.

A checkpoint exists under its final name only once it is complete: it is written to a
temporary name, flushed to disk and renamed. A crash mid-write leaves a `.tmp` file that
resume ignores (and the next save removes), never a half-written file that looks complete.
DDP checkpoints are files `step_XXXXXXXXX.pt`; DeepSpeed checkpoints are folders
`step_XXXXXXXXX` (one shard per rank inside) committed the same way.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{9})(\.pt)?$")


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:09d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (files or DeepSpeed folders) in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write `state` atomically as the checkpoint of `step`, then prune to the newest `keep_last`."""
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale(directory)
    final = checkpoint_path(directory, step)
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    commit(tmp, final)
    prune(directory, keep_last)
    return final


def commit(tmp: Path, final: Path) -> None:
    """Make a fully written file or folder visible under its final name, atomically."""
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def remove_stale(directory: Path) -> None:
    """Delete what an interrupted save left behind under temporary names."""
    for stale in directory.glob("*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def prune(directory: Path, keep_last: int) -> None:
    for _, old in list_checkpoints(directory)[:-keep_last]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with `weights_only=True`: a checkpoint is data, never code to execute."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise RuntimeError(f"checkpoint {path} cannot be loaded ({exc}); delete it or pick another with run.resume=PATH") from exc


def resolve_resume(resume: str, directory: Path) -> Path | None:
    """Which checkpoint a run should start from: `auto` (newest complete), `never`, or an explicit path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(directory)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"run.resume={resume!r}: no such checkpoint file (use auto, never, or a path)")
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
