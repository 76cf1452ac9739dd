"""pytest fixtures for a two-host network and a private SLURM cluster on it; import them into a test module.

They skip, saying why, where the machine cannot make namespaces or has no SLURM. With
`UNETDIST_REQUIRE_CLUSTER=1` (set by .ci/run, which installs SLURM) the same condition fails instead,
so CI can never pass by skipping. Teardown runs on failure too: no daemon, namespace or bridge is left.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster import netns, slurm
from tests.cluster.netns import HostNetwork
from tests.cluster.slurm import PrivateSlurm

INJECT = Path(__file__).resolve().parent / "inject"
NODES = ("node0", "node1")


def _unavailable(reason: str) -> None:
    if os.environ.get("UNETDIST_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"UNETDIST_REQUIRE_CLUSTER=1 but {reason}")
    pytest.skip(reason)


def _workdir() -> Path:
    """A 0755 folder (munged refuses a socket below pytest's 0700 tmp_path)."""
    root = Path(tempfile.mkdtemp(prefix="unetdist-cluster-"))
    root.chmod(0o755)
    return root


@pytest.fixture(scope="module")
def host_network() -> Iterator[HostNetwork]:
    """Two hosts, node0 and node1, each a network namespace with its own hostname and address."""
    reason = netns.unavailable_reason()
    if reason:
        _unavailable(reason)
    root = _workdir()
    try:
        with HostNetwork(root / "net", NODES) as net:
            yield net
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[PrivateSlurm]:
    """slurmctld on this machine and slurmd on node0 and node1 (one stand-in GPU each)."""
    reason = netns.unavailable_reason() or slurm.unavailable_reason()
    if reason:
        _unavailable(reason)
    root = _workdir()
    try:
        with HostNetwork(root / "net", NODES) as net, PrivateSlurm(root / "slurm", net) as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


def probe_env(record_dir: Path, **extra: str) -> dict[str, str]:
    """Environment that loads the test probes (tests/cluster/inject) into every Python started with it."""
    path = os.pathsep.join(p for p in (str(INJECT), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "UNETDIST_TEST_RECORD": str(record_dir), **extra}


def read_records(record_dir: Path) -> list[dict]:
    """What each worker wrote at start (tests/cluster/inject/sitecustomize.py), oldest first."""
    records = [json.loads(p.read_text()) for p in record_dir.glob("[0-9]*.json")]
    return sorted(records, key=lambda r: r["time"])
