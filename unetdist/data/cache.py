"""A node-local shard cache: each remote shard downloaded once per node, later epochs read from disk.

All ranks and DataLoader workers of a node share `data.cache.dir` (a local disk). A shard is
downloaded by one process under an exclusive `flock` on `<file>.lock` into a temporary name and
renamed into place (atomic), so a reader never sees half a shard; the others wait on the lock and
then find it. Every use touches the file's mtime; when the cache holds more than
`data.cache.max_bytes`, the least recently used shards are deleted (a process still reading one
keeps its open file). A background thread per process downloads the next shards of a partition
while the current one is read (`data.cache.prefetch`).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from unetdist.data.remote import ShardOpener

log = logging.getLogger(__name__)
PARTIAL = ".part-"


class ShardCache:
    """One process's handle on a node's cache folder."""

    def __init__(self, opener: ShardOpener) -> None:
        self.opener = opener
        self.folder = Path(opener.cache_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = opener.cache_max_bytes
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future[Path]] = {}
        self._lock = threading.Lock()

    def path(self, url: str) -> Path:
        """The file that holds `url` once cached (a hash keeps two roots' `train-000000.tar` apart)."""
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        return self.folder / f"{digest}-{url.rstrip('/').rsplit('/', 1)[-1]}"

    def get(self, url: str) -> Path:
        """The cached copy of `url`, downloading it first if no process of this node has."""
        with self._lock:
            pending = self._pending.pop(url, None)
        if pending is not None:
            try:
                pending.result()  # (its file may have been evicted since: checked below)
            except OSError:
                pass  # the prefetch failed; try once more here, reporting the error this time
        target = self.path(url)
        if target.is_file():
            os.utime(target)
            return target
        return self._fetch(url)

    def _fetch(self, url: str) -> Path:
        """Download under the shard's lock unless another process of the node did, then evict."""
        target = self.path(url)
        with open(f"{target}.lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            if not target.is_file():
                self._download(url, target)
            os.utime(target)
        self._evict(keep=target)
        return target

    def _download(self, url: str, target: Path) -> None:
        partial = target.with_name(f"{target.name}{PARTIAL}{os.getpid()}-{threading.get_ident()}")
        try:
            with self.opener.open(url) as source, open(partial, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        log.info("cached %s (%d bytes)", url, target.stat().st_size)

    def _evict(self, keep: Path) -> None:
        """Delete least recently used shards until the cache fits in max_bytes (0: no limit)."""
        if self.max_bytes <= 0:
            return
        with open(self.folder / ".evict.lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            files = []
            for entry in os.scandir(self.folder):
                if entry.is_file() and not entry.name.startswith(".") and PARTIAL not in entry.name \
                        and not entry.name.endswith(".lock"):
                    stat = entry.stat()
                    files.append((stat.st_mtime, stat.st_size, Path(entry.path)))
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files):
                if total <= self.max_bytes:
                    break
                if path != keep:
                    path.unlink(missing_ok=True)
                    total -= size

    def prefetch(self, urls: list[str]) -> None:
        """Download these shards in the background (one thread), unless cached or already queued."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch")
            for url in urls:
                if url not in self._pending and not self.path(url).is_file():
                    self._pending[url] = self._pool.submit(self._fetch_quietly, url)

    def _fetch_quietly(self, url: str) -> Path:
        try:
            return self._fetch(url)
        except OSError as exc:
            log.warning("prefetching %s failed (%s); it is tried again when needed", url, exc)
            raise


_caches: dict[tuple[int, ShardOpener], ShardCache] = {}


def node_cache(opener: ShardOpener) -> ShardCache:
    """This process's cache handle for these settings (created on first use, e.g. in a DataLoader worker)."""
    key = (os.getpid(), opener)  # a forked worker must not use its parent's prefetch thread
    cache = _caches.get(key)
    if cache is None:
        cache = _caches[key] = ShardCache(opener)
    return cache
