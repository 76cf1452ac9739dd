"""launch/torchrun.sh on two separate hosts (network namespaces, c10d rendezvous) equals a one-host run.

Also checks that every launch script prints the exact command it runs, and that the DeepSpeed launcher's
own argument parser reads launch/deepspeed.sh's command as intended.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from tests.cluster.fixtures import NODES, host_network, probe_env, read_records  # noqa: F401 (fixture)
from tests.cluster.netns import HostNetwork
from tests.cluster.procs import run_tree
from tests.conftest import PYTHON, REPO, tiny_overrides
from tests.e2e.tb import read_scalars

pytestmark = pytest.mark.slow

STEPS = 6


def _overrides(run_dir: Path, data: Path) -> list[str]:
    return [*tiny_overrides(run_dir, data), f"train.steps={STEPS}", "train.val_every=0", "train.ckpt_every=0",
            "train.log_every=1"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHON": PYTHON, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def test_two_hosts_train_like_one_host_with_two_processes(host_network: HostNetwork, tmp_path: Path,
                                                          tiny_data: Path) -> None:
    multi, single, records = tmp_path / "multi", tmp_path / "single", tmp_path / "ranks"
    procs = []
    for node_rank, host in enumerate(NODES):
        env = _env(NNODES="2", NODE_RANK=str(node_rank), MASTER_ADDR="node0", MASTER_PORT="29500",
                   NPROC_PER_NODE="1", MAX_RESTARTS="0", **probe_env(records))
        argv = host_network.command(host, [str(REPO / "launch/torchrun.sh"), "configs/default.yaml",
                                           *_overrides(multi, tiny_data)])
        procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            proc.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "--rdzv_endpoint=node0:29500" in outputs[0] and "--rdzv_conf=is_host=1" in outputs[0]

    ranks = read_records(records)
    assert sorted(r["hostname"] for r in ranks) == ["node0", "node1"] and len({r["netns"] for r in ranks}) == 2
    assert sorted(r["rank"] for r in ranks) == [0, 1]

    local = run_tree([str(REPO / "launch/local.sh"), "configs/default.yaml", *_overrides(single, tiny_data)],
                     timeout=300, cwd=REPO, env=_env(NPROC_PER_NODE="2", MAX_RESTARTS="0"))
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    assert "--standalone" in local.stderr

    name = f"checkpoints/step_{STEPS:09d}.pt"
    a = torch.load(multi / name, weights_only=True)
    b = torch.load(single / name, weights_only=True)
    assert a["world_size"] == b["world_size"] == 2
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"{key} differs between two hosts and one host"
    assert read_scalars(multi / "tb")["train/loss"] == read_scalars(single / "tb")["train/loss"]


def _dry(script: str, *args: str, **env: str) -> str:
    proc = subprocess.run([str(REPO / script), *args], env={**os.environ, "DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.split("running: ", 1)[1].strip()


def test_launch_scripts_print_the_command_they_run() -> None:
    node = _dry("launch/torchrun.sh", "configs/gpu-8x.yaml", "data.root=/shared/x",
                NNODES="4", NODE_RANK="2", MASTER_ADDR="10.0.0.5", NPROC_PER_NODE="8")
    assert node.startswith("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 ")
    for part in ("-m unetdist.parallel.agent --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d",
                 "--rdzv_endpoint=10.0.0.5:29500", "--rdzv_conf=is_host=0", "--max-restarts=3",
                 "-m unetdist.train --config configs/gpu-8x.yaml data.root=/shared/x"):
        assert part in node, (part, node)

    local = _dry("launch/local.sh", "configs/default.yaml", MASTER_ADDR="10.0.0.5", NNODES="4")
    assert "--nnodes=1 --nproc_per_node=1 --standalone" in local and "10.0.0.5" not in local

    ds = _dry("launch/deepspeed.sh", "configs/gpu-8x.yaml", "data.root=/shared/x", HOSTFILE="/etc/hostfile",
              NUM_GPUS="8", MASTER_ADDR="gpu-01")
    argv = shlex.split(ds)
    assert Path(argv[0]).name == "deepspeed"
    assert argv[1:] == ["--hostfile", "/etc/hostfile", "--num_gpus", "8", "--master_addr", "gpu-01", "--module",
                        "unetdist.train", "--config", "configs/gpu-8x.yaml", "parallel.backend=deepspeed",
                        "data.root=/shared/x"]
    runner = pytest.importorskip("deepspeed.launcher.runner")
    parsed = runner.parse_args(argv[1:])
    assert (parsed.hostfile, parsed.num_gpus, parsed.module, parsed.user_script) == ("/etc/hostfile", 8, True,
                                                                                    "unetdist.train")
    assert parsed.user_args == ["--config", "configs/gpu-8x.yaml", "parallel.backend=deepspeed", "data.root=/shared/x"]


def test_deepspeed_sh_trains_on_this_machine(tmp_path: Path, tiny_data: Path) -> None:
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    proc = run_tree([str(REPO / "launch/deepspeed.sh"), str(REPO / "configs/default.yaml"),
                     *tiny_overrides(run_dir, tiny_data), "train.steps=2", "train.val_every=0", "train.ckpt_every=0",
                     "train.log_every=1"],
                    timeout=300, cwd=tmp_path, env=_env(NUM_GPUS="2"))  # no ./hostfile there: this machine only
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    command = next(line for line in proc.stderr.splitlines() if "deepspeed.sh: running: " in line)
    assert "--num_gpus 2 --module unetdist.train" in command and "--hostfile" not in command
    assert (run_dir / "checkpoints" / "step_000000002").is_dir()
    assert [s for s, _ in read_scalars(run_dir / "tb")["train/loss"]] == [1, 2]


def test_multi_node_without_an_endpoint_is_refused() -> None:
    proc = subprocess.run([str(REPO / "launch/torchrun.sh"), "configs/default.yaml"],
                          env={**os.environ, "NNODES": "2", "DRY_RUN": "1"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "needs MASTER_ADDR" in proc.stderr
