"""Training from a real shard server: nginx in a network namespace, a 1 Gbit/s tbf-shaped link, added latency.

Two ranks train from `data.root=http://...` once with the node cache, once streaming with the server
killed for 3 s after the first shard requests and started again: the final parameters are identical
(the retries resume at the same byte, so the data order never changes) and TensorBoard counts the
retries. `unetdist bench loader --url` runs against the same server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.cluster.netns import unavailable_reason
from tests.cluster.shard_server import DelayProxy, ShardServer
from tests.conftest import PYTHON, REPO, free_port, run_cmd, tiny_overrides
from tests.e2e.tb import read_scalars

pytestmark = pytest.mark.slow
STEPS = 8


@pytest.fixture(scope="module")
def server(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ShardServer, str]]:
    reason = unavailable_reason()
    if reason:
        if os.environ.get("UNETDIST_REQUIRE_CLUSTER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("shard-server")
    site = work / "site"
    shutil.copytree(tiny_data, site)
    from unetdist.bench.loader_url import write_per_file_tiles

    write_per_file_tiles(str(site), str(site / "per-file"))
    store = ShardServer(work / "server", site, rate="1gbit")
    (work / "server").mkdir()
    proxy = None
    try:
        store.start()
        proxy = DelayProxy(store.addr, 8080, delay=0.010).start()  # 20 ms round trip
        yield store, f"http://127.0.0.1:{proxy.port}"
    finally:
        if proxy is not None:
            proxy.close()
        store.close()


def _command(run_dir: Path, url: str, *extra: str) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            "-m", "unetdist.train", "--config", str(REPO / "configs/default.yaml"),
            *tiny_overrides(run_dir, Path("unused")), f"data.root={url}", f"train.steps={STEPS}",
            "train.log_every=1", "train.val_every=0", "train.ckpt_every=0", "data.workers=1",
            "data.retry_wait=0.5", *extra]


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(k) for k in out] + [g for k in out for g in _descendants(int(k))]


def _start(cmd: list[str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})


def _finish(proc: subprocess.Popen, log_path: Path, timeout: float = 300) -> None:
    """Wait for a training; if it hangs, every process it started dumps its Python stacks into the log."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _descendants(proc.pid):  # only this run's own processes
            try:
                os.kill(pid, signal.SIGABRT)
            except ProcessLookupError:
                pass
        time.sleep(3)
        proc.kill()
        proc.wait()
        rc = None
    assert rc == 0, log_path.read_text()[-6000:]


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / f"step_{STEPS:09d}.pt", weights_only=True, map_location="cpu")
    return state["model"]


def test_two_ranks_train_from_the_server_and_an_outage_changes_nothing(server: tuple[ShardServer, str],
                                                                       tmp_path: Path) -> None:
    store, url = server
    cached = tmp_path / "cached"
    _finish(_start(_command(cached, url, f"data.cache.dir={tmp_path / 'cache'}"), tmp_path / "cached.log"),
            tmp_path / "cached.log")
    assert len(list((tmp_path / "cache").glob("*-train-*.tar"))) == len(list(store.folder.glob("train-*.tar")))

    before = len(store.requests())
    streamed = tmp_path / "streamed"
    run = _start(_command(streamed, url), tmp_path / "streamed.log")
    try:
        deadline = time.monotonic() + 300
        while not any("GET /train-" in r for r in store.requests()[before:]):
            assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "streamed.log").read_text()
            time.sleep(0.02)
        store.stop()  # mid-epoch: the ranks are reading their first shards
        time.sleep(3)
        store.start()
        _finish(run, tmp_path / "streamed.log")
    finally:
        if run.poll() is None:
            run.kill()
    a, b = _final_model(cached), _final_model(streamed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the outage changed the training"
    scalars = read_scalars(streamed / "tb")
    assert scalars["train/data_retries"][-1][1] > 0  # the outage was seen and retried
    assert scalars["train/data_skipped"][-1][1] == 0  # and nothing was lost
    assert read_scalars(cached / "tb")["train/data_retries"][-1][1] == 0


def test_bench_loader_url_reports_local_server_cache_and_per_file(server: tuple[ShardServer, str],
                                                                   tmp_path: Path) -> None:
    _, url = server
    out = tmp_path / "bench.json"
    proc = run_cmd([PYTHON, "-m", "unetdist.bench.loader", "--url", url, "--augment", "none",
                    "--batch-size", "4", "--batches", "3", "--repeats", "1", "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["median"]) == {"local", "server", "server + cache", "per-file"}
    assert all(v > 0 for v in result["median"].values())
    assert "server / per-file" in proc.stdout
