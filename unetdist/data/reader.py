"""Reading shards robustly: samples of one shard URL, and decoding with integrity checks.

At cluster scale some shard will be truncated by a failed copy, or have a flipped byte. One bad
shard or sample must not stop a multi-day run: the reader stops at a broken tar and `decode`
rejects a sample whose members are missing, fail their CRC-32 (stored in the `.json` member by
`unetdist shard`) or do not decode to consistent shapes and class ids. Both are reported to an
`on_error` callback, which the loaders use to log a warning and count the event.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from unetdist.data.remote import open_url

log = logging.getLogger(__name__)

ErrorCallback = Callable[[str, str], None]  # (where, what went wrong)
READ_BUFFER = 1 << 20  # tar stream reads: the default 10 KiB costs a join per block of a 512 KiB member


class BadSample(ValueError):
    """A sample that cannot be used; the message says why."""


def _split_name(name: str) -> tuple[str, str] | None:
    """(key, suffix) of a member name: the suffix starts at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    if "." not in base:
        return None
    key, suffix = base.split(".", 1)
    return (f"{folder}/{key}" if folder else key), suffix.lower()


def shard_samples(url: str, on_error: ErrorCallback | None = None, expected: int | None = None,
                  open_stream: Callable[[str], Any] = open_url) -> Iterator[dict[str, Any]]:
    """Raw samples (undecoded bytes per member) of one shard, in tar order; any WebDataset URL.

    http(s)/s3/gs URLs are read by `unetdist.data.remote`, which retries and resumes at the same byte.

    Without `on_error`, a broken shard raises. With it, the error is reported once and the shard
    ends there (a tar stream cannot be re-synchronised); the sample being read is dropped. A tar
    cut at a member boundary reads as a shorter valid tar: given the `expected` sample count, a
    shard read to its end with fewer samples is reported too.
    """
    stream = None
    current: dict[str, Any] | None = None
    count = 0
    try:
        stream = open_stream(url)
        with tarfile.open(fileobj=stream, mode="r|", bufsize=READ_BUFFER) as tar:
            for info in tar:
                parts = _split_name(info.name) if info.isreg() else None
                if parts is None or parts[0].startswith("__"):
                    continue
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                tar.members = []  # streaming: do not keep every header
                if current is None or parts[0] != current["__key__"]:
                    if current is not None:
                        count += 1
                        yield current
                    current = {"__key__": parts[0], "__url__": url}
                current[parts[1]] = data
        if current is not None:
            count += 1
            yield current
            current = None
        if expected is not None and count < expected:
            if on_error is None:
                raise BadSample(f"{url} ended after {count} of its {expected} samples (truncated?)")
            on_error(url, f"shard ended after {count} of its {expected} samples (truncated?)")
    except Exception as exc:  # tarfile, OSError, pipe exit codes
        if on_error is None:
            raise
        dropped = f" (sample {current['__key__']} dropped)" if current else ""
        on_error(url, f"shard unreadable after this point: {type(exc).__name__}: {exc}{dropped}")
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception as exc:  # a pipe: command that failed after its output was read
                if on_error is None:
                    raise
                on_error(url, f"closing the stream failed: {exc}")


def decode(sample: dict[str, Any], num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(image C x T x T, label T x T, weight T x T or None), stored dtypes, of a raw sample; BadSample if damaged.

    Weight maps stay float16 here: the loaders convert them while copying into the float32 batch.
    """
    key = sample.get("__key__")
    meta: dict[str, Any] = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadSample(f"sample {key}: its .json member is damaged ({exc})") from exc
    for name, expected in (meta.get("crc32") or {}).items():
        if name not in sample:
            raise BadSample(f"sample {key}: member {name} is missing")
        if zlib.crc32(sample[name]) != expected:
            raise BadSample(f"sample {key}: member {name} fails its CRC-32 check")
    for name in ("img.npy", "lbl.npy"):
        if name not in sample:
            raise BadSample(f"sample {key} has no {name} member; shards must be written by `unetdist shard`")
    try:
        image, label = npy_view(sample["img.npy"]), npy_view(sample["lbl.npy"])
        weight = npy_view(sample["wgt.npy"]) if "wgt.npy" in sample else None
    except (ValueError, OSError, EOFError) as exc:
        raise BadSample(f"sample {key}: a member does not decode as .npy ({exc})") from exc
    if image.ndim != 3 or label.shape != image.shape[-2:] or (weight is not None and weight.shape != label.shape):
        raise BadSample(f"sample {key}: shapes image {image.shape}, label {label.shape}"
                        f"{'' if weight is None else f', weight {weight.shape}'} do not fit together")
    if label.size and int(label.max()) >= num_classes:
        raise BadSample(f"sample {key}: label value {int(label.max())} >= num_classes={num_classes}")
    if weight is not None and weight.dtype.kind != "f":
        raise BadSample(f"sample {key}: weight map dtype {weight.dtype} is not floating point")
    return image, label, weight


def npy_view(data: bytes) -> np.ndarray:
    """A read-only array over the bytes of a .npy file, without copying the pixels (np.load copies)."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - stream.tell() != count * dtype.itemsize:
        raise ValueError(f"{len(data) - stream.tell()} data bytes for shape {shape} of {dtype}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return array.reshape(shape, order="F" if fortran else "C")


class SkipLog:
    """Counts skipped shards and samples in one process and logs them, without flooding the log."""

    LOUD = 10  # the first events are logged one by one, then every 100th

    def __init__(self, what: str) -> None:
        self.what = what
        self.total = 0
        self.pending = 0  # events since the last `take`

    def __call__(self, where: str, problem: str) -> None:
        self.total += 1
        self.pending += 1
        if self.total <= self.LOUD or self.total % 100 == 0:
            log.warning("%s data: skipped %s: %s (%d skipped so far in this loader process)",
                        self.what, where, problem, self.total)

    def take(self) -> int:
        """Events since the previous call."""
        count, self.pending = self.pending, 0
        return count
