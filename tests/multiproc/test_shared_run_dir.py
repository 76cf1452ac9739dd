"""Multi-node runs need one shared run.dir: two "nodes" (two real gloo processes, each its node's local rank 0)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.multiproc.spawn import spawn

pytestmark = pytest.mark.slow


def _worker(dirs: list[str], out: str) -> None:
    from unetdist.config import ConfigError
    from unetdist.parallel.env import destroy_distributed, init_distributed
    from unetdist.parallel.shared_dir import MARKER, check_shared_run_dir

    env = init_distributed()
    env = dataclasses.replace(env, local_rank=0, local_world_size=1)  # one rank per node, as on 2 nodes x 1 GPU
    try:
        run_dir = Path(dirs[env.rank])  # the folder this node sees at run.dir's path
        try:
            check_shared_run_dir(env, run_dir, wait_s=1.0)
            result = "ok"
        except ConfigError as exc:
            result = str(exc)
        leftovers = [p.name for p in run_dir.glob(f"{MARKER}*")] if run_dir.exists() else []
        Path(f"{out}.{env.rank}").write_text(json.dumps({"result": result, "leftovers": leftovers}))
    finally:
        destroy_distributed()


def _run(tmp_path: Path, dirs: list[Path]) -> list[dict]:
    out = tmp_path / "result"
    spawn(_worker, 2, [str(d) for d in dirs], str(out))
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]


def test_nodes_sharing_run_dir_pass(tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "run"
    results = _run(tmp_path, [shared, shared])
    assert [r["result"] for r in results] == ["ok", "ok"]
    assert results[0]["leftovers"] == [] and results[1]["leftovers"] == []  # the marker is removed


def test_a_node_with_its_own_disk_stops_every_rank(tmp_path: Path) -> None:
    results = _run(tmp_path, [tmp_path / "node0" / "run", tmp_path / "node1" / "run"])
    for r in results:  # every rank raises the same error, so no rank goes on alone
        assert "is not the same folder on every node" in r["result"], r
        assert "(rank 1) cannot see the file rank 0 wrote" in r["result"] and "NFS, Lustre, GPFS" in r["result"]
    assert not (tmp_path / "node1" / "run").exists()  # nothing written on the node that could not see it
