"""What the launch scripts run on GPU machines, checked by running them with DRY_RUN=1 in GPU-like environments.

Launchers parse the printed commands (DeepSpeed's own runner), so a command that looks right but
selects the wrong GPUs fails here. `nvidia-smi` is a small executable on PATH that prints the
lines a real one prints for `-L`: the scripts only count them.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

GPU_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "NUM_GPUS", "NPROC_PER_NODE",
            "HOSTFILE", "MASTER_ADDR", "MASTER_PORT")


def _dry(script: str, *args: str, path_dir: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in GPU_VARS and not k.startswith("SLURM_")}
    if path_dir is not None:
        base["PATH"] = f"{path_dir}:{base['PATH']}"
    return subprocess.run([str(REPO / script), *args], env={**base, "DRY_RUN": "1", **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def _command(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    line = proc.stderr.split("running: ", 1)[1].strip().splitlines()[0]
    return shlex.split(line)


def _nvidia_smi(tmp_path: Path, gpus: int) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    lines = "\\n".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})" for i in range(gpus))
    tool = bin_dir / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\nprintf '{lines}\\n'\n")
    tool.chmod(0o755)
    return bin_dir


def test_deepspeed_sh_runs_on_the_visible_gpus(tmp_path: Path) -> None:
    runner = pytest.importorskip("deepspeed.launcher.runner")
    argv = _command(_dry("launch/deepspeed.sh", "configs/gpu-8x.yaml", CUDA_VISIBLE_DEVICES="4,5,6,7"))
    args = runner.parse_args(argv[1:])
    assert args.include == "localhost:4,5,6,7" and args.num_gpus == -1
    # What DeepSpeed's runner makes of it on an 8-GPU node: GPUs 4-7, not 0-3.
    active = runner.parse_inclusion_exclusion({"localhost": 8}, args.include, args.exclude)
    assert dict(active) == {"localhost": [4, 5, 6, 7]}

    two = runner.parse_args(_command(_dry("launch/deepspeed.sh", CUDA_VISIBLE_DEVICES="6,7,2", NUM_GPUS="2"))[1:])
    assert two.include == "localhost:6,7"

    uuid = _dry("launch/deepspeed.sh", CUDA_VISIBLE_DEVICES="GPU-0a1b,GPU-2c3d")
    assert uuid.returncode == 2 and "not a list of GPU indices" in uuid.stderr

    hosts = runner.parse_args(_command(_dry("launch/deepspeed.sh", HOSTFILE="/etc/hostfile",
                                            CUDA_VISIBLE_DEVICES="4,5"))[1:])
    assert (hosts.hostfile, hosts.include, hosts.num_gpus) == ("/etc/hostfile", "", -1)  # the hostfile's slots

    alone = runner.parse_args(_command(_dry("launch/deepspeed.sh", path_dir=_nvidia_smi(tmp_path, 2)))[1:])
    assert alone.num_gpus == 2


def _slurm(tmp_path: Path, smi: int | None, **env: str) -> tuple[int, str]:
    job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_SUBMIT_DIR": str(REPO), **env}
    proc = _dry("slurm/train.sh", "configs/gpu-8x.yaml",
                path_dir=_nvidia_smi(tmp_path, smi) if smi is not None else None, **job)
    argv = _command(proc)
    nproc = int(next(a for a in argv if a.startswith("--nproc_per_node=")).split("=")[1])
    return nproc, proc.stderr


@pytest.mark.parametrize(("env", "smi", "expected", "said"), [
    ({"SLURM_GPUS_ON_NODE": "8"}, 8, 8, "from SLURM_GPUS_ON_NODE=8 (nvidia-smi -L lists 8)"),
    ({"SLURM_GPUS_PER_NODE": "h100:8"}, None, 8, "from SLURM_GPUS_PER_NODE=h100:8"),
    ({"SLURM_GPUS_PER_NODE": "4"}, None, 4, "from SLURM_GPUS_PER_NODE=4"),
    ({"SLURM_GPUS_PER_NODE": "a100:2,v100:2"}, None, 4, "from SLURM_GPUS_PER_NODE=a100:2,v100:2"),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, None, 3, "from CUDA_VISIBLE_DEVICES=0,1,2"),
    ({}, 4, 4, "SLURM gives no GPU count"),                  # older SLURM: GPUs not tracked
    ({"SLURM_GPUS_ON_NODE": "8"}, 4, 4, "nvidia-smi -L lists 4 GPU(s)"),  # fewer GPUs than claimed: use those
    ({}, None, 1, "no GPUs found"),
    ({"NPROC_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "8"}, None, 3, "from NPROC_PER_NODE"),
])
def test_slurm_train_sh_counts_gpus_and_says_so(tmp_path: Path, env: dict[str, str], smi: int | None,
                                                 expected: int, said: str) -> None:
    nproc, stderr = _slurm(tmp_path, smi, **env)
    assert nproc == expected, stderr
    assert said in stderr, stderr
    assert re.search(r"\d+ process\(es\) per node|starting \d+ process", stderr), stderr
