"""Writing tar shards that never look complete before they are: `.tmp` names, fsync, rename.

Kept apart from the tiling logic so the crash-safety rules live in one small place.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

_RECORD = tarfile.RECORDSIZE  # tar files are padded to a multiple of this


class ShardSink:
    """Writes `<prefix>-NNNNNN.tar` files of at most `max_bytes` (unless one sample is larger)
    and, when given, at most `max_samples` samples.

    Each tar is written as `<name>.tmp` and renamed when closed; members have fixed owner and
    mtime so the same input gives byte-identical shards.
    """

    def __init__(self, out_dir: Path, prefix: str, max_bytes: int, max_samples: int | None = None) -> None:
        self.out_dir, self.prefix, self.max_bytes, self.max_samples = out_dir, prefix, max_bytes, max_samples
        self.shards: list[dict[str, Any]] = []  # {"name", "samples"} of completed shards
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(512 + -(-len(data) // 512) * 512 for data in members.values())
        full = self.max_samples is not None and self._count >= self.max_samples
        if self._tar is not None and (full or tar_size(self._tar.offset + size) > self.max_bytes):
            self._finish()
        if self._tar is None:
            self._tmp = self.out_dir / f"{self.prefix}-{len(self.shards):06d}.tar.tmp"
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        """Delete the shard in progress and the shards this sink completed."""
        if self._tar is not None:
            self._tar.close()
        for path in [self._tmp] + [self.out_dir / s["name"] for s in self.shards]:
            if path is not None:
                path.unlink(missing_ok=True)
        self._tar, self._tmp, self.shards = None, None, []

    def _finish(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        final = self._tmp.with_suffix("")  # drop ".tmp"
        fsync(self._tmp)
        os.replace(self._tmp, final)
        self.shards.append({"name": final.name, "samples": self._count})
        self._tar, self._tmp, self._count = None, None, 0


def tar_size(offset: int) -> int:
    """Bytes on disk of a tar whose members end at `offset` (end blocks, record padding)."""
    return -(-(offset + 1024) // _RECORD) * _RECORD


def fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
