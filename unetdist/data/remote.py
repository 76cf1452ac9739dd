"""Shards and manifests from a server or object store, with retries that continue at the same byte.

On a cloud cluster `data.root` is an http(s):// URL (nginx, a bucket's HTTP endpoint) or an
s3:// / gs:// bucket. Connections get reset and servers restart during a multi-day run; a retry
must neither change the data order nor re-read what was already used. So a stream remembers how
many bytes it delivered and, after a failure, reconnects with an HTTP Range request from there
(a server without Range support sends the whole file: the delivered prefix is read and dropped),
waiting `retry_wait * 2**attempt` seconds (capped at 30 s) between attempts, `retries` attempts
per failure. Only then does the error reach the loader, which skips the rest of the shard and
counts its samples like damaged ones. Retries are counted per process (`retries_so_far`), so the
loaders can put them in each batch and the trainer in TensorBoard.

s3:// and gs:// go through the clouds' own command-line tools, as WebDataset's `pipe:` URLs do
(`aws s3 cp URL -`, `gcloud storage cat URL`; a non-zero exit is a failure), with the same
retries (re-reading and dropping the delivered prefix); any other
WebDataset URL (`pipe:...`, local paths) is opened by WebDataset's `gopen`.
"""

from __future__ import annotations

import http.client
import io
import logging
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from webdataset.gopen import gopen

log = logging.getLogger(__name__)

_retries = 0
_lock = threading.Lock()
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
MAX_WAIT = 30.0


def retries_so_far() -> int:
    """Retries made by this process since it started (all streams, all threads)."""
    return _retries


def _count_retry() -> None:
    global _retries
    with _lock:
        _retries += 1


def is_remote(url: str) -> bool:
    """A URL that names a server or bucket (not a local path or a `pipe:` command)."""
    return url.split("://", 1)[0].lower() in ("http", "https", "s3", "gs") if "://" in url else False


def _cloud_command(url: str) -> list[str]:
    """The clouds' own tools, as WebDataset's `pipe:` examples use them."""
    if url.split("://", 1)[0].lower() == "s3":
        return ["aws", "s3", "cp", "--quiet", url, "-"]
    return ["gcloud", "storage", "cat", url]


class _CommandSource:
    """A command's standard output; its exit status is checked at the end, so a failed copy is an error."""

    def __init__(self, argv: list[str]) -> None:
        try:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError as exc:
            raise _Fatal(f"`{argv[0]}` is not installed; it reads {argv[-2] if argv[0] == 'aws' else argv[-1]}") from exc
        self.argv = argv

    def readinto(self, buffer: Any) -> int:
        assert self.proc.stdout is not None
        n = self.proc.stdout.readinto(buffer)
        if n == 0 and self.proc.wait() != 0:
            error = (self.proc.stderr.read() if self.proc.stderr else b"").decode(errors="replace").strip()
            raise ConnectionError(f"`{' '.join(self.argv)}` exited with {self.proc.returncode}: {error[-300:]}")
        return n

    def read(self, size: int) -> bytes:
        buffer = bytearray(size)
        n = self.readinto(buffer)
        return bytes(buffer[:n])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class ResumingStream(io.RawIOBase):
    """A read-only byte stream that reconnects after failures and continues at the byte it had reached."""

    def __init__(self, url: str, retries: int, retry_wait: float, timeout: float = 30.0) -> None:
        super().__init__()
        self.url, self.retries, self.retry_wait, self.timeout = url, retries, retry_wait, timeout
        self.position = 0
        self.length: int | None = None
        self.source: Any = None
        self._connect_with_retries(None)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        failures = 0
        while True:
            try:
                n = self.source.readinto(buffer)
                if n == 0 and self.length is not None and self.position < self.length:
                    raise ConnectionError(f"connection closed at byte {self.position} of {self.length}")
                self.position += n
                return n
            except (OSError, http.client.HTTPException, ValueError) as exc:
                failures += 1
                self._connect_with_retries(exc, failures)

    def close(self) -> None:
        if self.source is not None:
            try:
                self.source.close()
            except Exception:  # a pipe whose command failed after its output was read, a dead socket
                pass
            self.source = None
        super().close()

    def _connect_with_retries(self, error: BaseException | None, failures: int = 0) -> None:
        attempt = failures
        while True:
            if error is not None:
                if attempt > self.retries:
                    raise OSError(f"{self.url}: gave up after {self.retries} retries at byte {self.position}: "
                                  f"{type(error).__name__}: {error}") from error
                wait = min(MAX_WAIT, self.retry_wait * 2 ** max(0, attempt - 1))
                log.warning("%s: %s: %s; retry %d of %d in %.1f s at byte %d", self.url, type(error).__name__,
                            error, attempt, self.retries, wait, self.position)
                _count_retry()
                time.sleep(wait)
            try:
                self._connect()
                return
            except _Fatal:
                raise
            except (OSError, http.client.HTTPException) as exc:
                error, attempt = exc, attempt + 1

    def _connect(self) -> None:
        if self.source is not None:
            try:
                self.source.close()
            except Exception:
                pass
            self.source = None
        if self.url.split("://", 1)[0].lower() in ("http", "https"):
            self.source = self._http()
        else:
            self.source = _CommandSource(_cloud_command(self.url))
            _discard(self.source, self.position)

    def _http(self) -> Any:
        headers = {"Range": f"bytes={self.position}-"} if self.position else {}
        try:
            response = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code in RETRYABLE_STATUS:
                raise
            kind = _NotFound if exc.code in (404, 410) else _Fatal
            raise kind(f"{self.url}: HTTP {exc.code} {exc.reason}") from exc
        if response.status == 206:
            if self.length is None:
                total = response.headers.get("Content-Range", "").rpartition("/")[2]
                self.length = int(total) if total.isdigit() else None
        else:
            size = response.headers.get("Content-Length")
            self.length = int(size) if size and size.isdigit() else None
            _discard(response, self.position)  # no Range support: drop what was delivered already
        return response


class _Fatal(OSError):
    """A failure that retrying cannot fix (404, 403, ...)."""


class _NotFound(_Fatal, FileNotFoundError):
    """HTTP 404/410: like a missing local file."""


def _discard(stream: Any, count: int) -> None:
    while count > 0:
        chunk = stream.read(min(count, 1 << 20))
        if not chunk:
            raise ConnectionError(f"stream ended {count} bytes before the position to resume at")
        count -= len(chunk)


class ReadAhead(io.RawIOBase):
    """Reads a stream in a background thread, up to `depth` chunks ahead, so downloading overlaps decoding."""

    CHUNK = 1 << 20

    def __init__(self, source: io.RawIOBase, depth: int = 8) -> None:
        super().__init__()
        self.source = source
        self.chunks: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self.pending = memoryview(b"")
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._fill, daemon=True, name="shard-read-ahead")
        self.thread.start()

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        try:
            while not self.stopping.is_set():
                chunk = self.source.read(self.CHUNK) or b""
                self._put(chunk)
                if not chunk:
                    return
        except BaseException as exc:  # handed to the reader, which raises it
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self.stopping.is_set():
            try:
                self.chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readinto(self, buffer: Any) -> int:
        if not self.pending:
            item = self.chunks.get()
            if isinstance(item, BaseException):
                self.chunks.put(item)  # every later read fails the same way
                raise item
            if not item:
                self.chunks.put(item)
                return 0
            self.pending = memoryview(item)
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self.stopping.set()
            self.thread.join(timeout=60)
            self.source.close()
        super().close()


def open_url(url: str, retries: int = 5, retry_wait: float = 0.5) -> IO[bytes]:
    """A readable binary stream of any shard URL; http(s), s3 and gs ones resume after failures.

    Remote streams are read ahead in a background thread (8 MiB), so the network and the decoding overlap.
    """
    if is_remote(url):
        return io.BufferedReader(ReadAhead(ResumingStream(url, retries, retry_wait)), buffer_size=1 << 20)
    return gopen(url, "rb")


def read_bytes(url: str, retries: int = 5, retry_wait: float = 0.5) -> bytes:
    """The whole content of a (small) file, e.g. a manifest."""
    with open_url(url, retries, retry_wait) as stream:
        return stream.read()


@dataclass(frozen=True)
class ShardOpener:
    """How the loaders open shards: retry settings and the node cache (picklable, for DataLoader workers)."""

    retries: int = 5
    retry_wait: float = 0.5
    cache_dir: str = ""
    cache_max_bytes: int = 0
    prefetch_count: int = 2

    @classmethod
    def from_config(cls, data: Any) -> ShardOpener:
        return cls(retries=data.retries, retry_wait=data.retry_wait, cache_dir=data.cache.dir,
                   cache_max_bytes=data.cache.max_bytes, prefetch_count=data.cache.prefetch)

    def open(self, url: str) -> IO[bytes]:
        return open_url(url, self.retries, self.retry_wait)

    def local(self, url: str, on_error: Callable[[str, str], None]) -> str | None:
        """Where to read `url` from: the node cache's copy for remote shards when there is a cache.

        None (after reporting) when the shard could not be downloaded even with retries.
        """
        if not self.cache_dir or not is_remote(url):
            return url
        from unetdist.data.cache import node_cache  # the cache downloads through this module

        try:
            return str(node_cache(self).get(url))
        except OSError as exc:
            on_error(url, f"shard unreachable, skipped: {exc}")
            return None

    def prefetch(self, urls: list[str]) -> None:
        """Start downloading the next shards into the node cache while the current one is read."""
        if self.cache_dir and self.prefetch_count > 0:
            from unetdist.data.cache import node_cache

            node_cache(self).prefetch([u for u in urls if is_remote(u)][: self.prefetch_count])
