"""Dataset download: checksums, caching, and offline or stalled networks failing fast with a clear message.

The network is real but local: a wheel built here and served by a real HTTP server on 127.0.0.1, a
server that accepts connections and never answers, and a port nobody listens on. (The real PyPI
download is exercised by tests/e2e/test_nuclei.py.)
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from unetdist.data.errors import DataError
from unetdist.data.fetch import CELLUNET_NUCLEI, DownloadError, WheelDataset, fetch
from unetdist.data.inputs import read_list


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


FILES = {"pkg/data/a.npy": b"image bytes", "pkg/data/b.npy": b"label bytes", "pkg/LICENSE": b"MIT licence"}


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A small wheel served over real HTTP; yields (base URL, wheel path)."""
    folder = tmp_path / "www"
    folder.mkdir()
    wheel = folder / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in FILES.items():
            archive.writestr(name, data)
    handler = functools.partial(_Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", wheel
    finally:
        server.shutdown()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def _dataset(url: str, wheel: Path, **kw: object) -> WheelDataset:
    files = {m: (m.rsplit("/", 1)[-1], _digest(d)) for m, d in FILES.items()}
    base = replace(CELLUNET_NUCLEI, name="toy", package="pkg", version="1.0", url=f"{url}/{wheel.name}",
                   wheel_sha256=_digest(wheel.read_bytes()), files=files,
                   pairs=[{"image": "a.npy", "label": "b.npy", "split": "train"}])
    return replace(base, **kw)


def test_download_verify_extract_and_cache(served: tuple[str, Path], tmp_path: Path) -> None:
    url, wheel = served
    ds = _dataset(url, wheel)
    folder = fetch(ds, tmp_path / "cache", pip_fallback=False)
    assert folder == tmp_path / "cache" / "toy" / "1.0"
    assert (folder / "a.npy").read_bytes() == b"image bytes" and (folder / "LICENSE").read_bytes() == b"MIT licence"
    assert [p.split for p in read_list(folder / "pairs.yaml")] == ["train"]
    offline = replace(ds, url="http://127.0.0.1:9/pkg-1.0-py3-none-any.whl")
    assert fetch(offline, tmp_path / "cache", pip_fallback=False) == folder  # cached: the network is not asked
    (folder / "b.npy").write_bytes(b"bit rot")
    with pytest.raises(DownloadError):  # a damaged cache is not trusted
        fetch(offline, tmp_path / "cache", pip_fallback=False)
    assert fetch(ds, tmp_path / "cache", pip_fallback=False) == folder
    assert (folder / "b.npy").read_bytes() == b"label bytes"
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_checksum_mismatches_are_refused(served: tuple[str, Path], tmp_path: Path) -> None:
    url, wheel = served
    with pytest.raises(DataError, match="SHA-256 .* is not the pinned 0000"):
        fetch(_dataset(url, wheel, wheel_sha256="0" * 64), tmp_path / "c1", pip_fallback=False)
    bad_member = _dataset(url, wheel)
    bad_member = replace(bad_member, files={**bad_member.files, "pkg/data/a.npy": ("a.npy", "f" * 64)})
    with pytest.raises(DataError, match=r"pkg/data/a\.npy .*is not the pinned ffff"):
        fetch(bad_member, tmp_path / "c2", pip_fallback=False)
    assert not (tmp_path / "c2" / "toy").exists()  # nothing half-extracted is left to look cached
    local = fetch(_dataset("http://127.0.0.1:9", wheel), tmp_path / "c3", wheel=wheel)  # --wheel: no network
    assert (local / "a.npy").is_file()


def test_offline_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    ds = replace(CELLUNET_NUCLEI, url="http://127.0.0.1:9/cellunet-0.2.2-py3-none-any.whl")  # nothing listens
    start = time.perf_counter()
    with pytest.raises(DownloadError, match=r"cannot download cellunet-0\.2\.2-py3-none-any\.whl .*offline.*--wheel"):
        fetch(ds, tmp_path, timeout=5, pip_fallback=False)
    assert time.perf_counter() - start < 5


def test_a_stalled_server_times_out_instead_of_hanging(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections (the kernel does) but never answers
    try:
        port = listener.getsockname()[1]
        ds = replace(CELLUNET_NUCLEI, url=f"http://127.0.0.1:{port}/cellunet-0.2.2-py3-none-any.whl")
        start = time.perf_counter()
        with pytest.raises(DownloadError, match="timed out"):
            fetch(ds, tmp_path, timeout=1.0, pip_fallback=False)
        assert time.perf_counter() - start < 10
    finally:
        listener.close()


def test_unknown_dataset_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'nope'; available: cellunet-nuclei"):
        fetch("nope", tmp_path)
