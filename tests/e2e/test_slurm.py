"""`sbatch slurm/train.sh` on a real private SLURM cluster: two slurmd "hosts" in network namespaces.

The job script runs exactly as a user submits it; only resources the test cluster lacks are overridden
on the sbatch command line (1 stand-in GPU and 1 CPU per node, logs in the test folder).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.cluster.fixtures import probe_env, read_records, slurm_cluster  # noqa: F401 (fixture)
from tests.cluster.slurm import PrivateSlurm
from tests.conftest import PYTHON, REPO, tiny_overrides
from tests.e2e.tb import read_scalars

pytestmark = pytest.mark.slow

DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def _submit(cluster: PrivateSlurm, work: Path, overrides: list[str], env: dict[str, str]) -> int:
    return cluster.sbatch(
        ["--gpus-per-node=1", "--cpus-per-task=1", "--time=15",
         f"--output={work}/%x-%j.out", f"--error={work}/%x-%j.err",
         "slurm/train.sh", "configs/default.yaml", *overrides],
        cwd=REPO, env={"PYTHON": PYTHON, "OMP_NUM_THREADS": "1", **env},
    )


def _log(work: Path, job: int) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(work.glob(f"*-{job}.*")))


def _wait_done(cluster: PrivateSlurm, work: Path, job: int, timeout: float) -> dict[str, str]:
    info = cluster.wait_job(job, DONE, timeout)
    assert info["JobState"] == "COMPLETED", f"{info}\n{_log(work, job)[-6000:]}\n{cluster.logs('slurmctld')}"
    return info


def test_sbatch_trains_two_ranks_across_two_nodes(slurm_cluster: PrivateSlurm, tmp_path: Path, tiny_data: Path) -> None:
    run_dir, records = tmp_path / "run", tmp_path / "ranks"
    overrides = [*tiny_overrides(run_dir, tiny_data), "train.steps=8", "train.val_every=4", "train.ckpt_every=4",
                 "train.log_every=2"]
    nccl = {"NCCL_SOCKET_IFNAME": "eth0", "NCCL_IB_DISABLE": "1"}  # must reach every rank unchanged
    job = _submit(slurm_cluster, tmp_path, overrides, probe_env(records, **nccl))
    _wait_done(slurm_cluster, tmp_path, job, timeout=240)
    log = _log(tmp_path, job)

    ranks = read_records(records)
    assert sorted((r["rank"], r["hostname"]) for r in ranks) == [(0, "node0"), (1, "node1")], log[-4000:]
    assert len({r["netns"] for r in ranks}) == 2, "both ranks ran in one network namespace"
    assert all(r["world_size"] == 2 and r["master_addr"] == "node0" for r in ranks)
    assert all(r["nccl"] == nccl for r in ranks), "NCCL_* variables did not pass through"
    assert f"--rdzv_id={job}" in log and "--rdzv_endpoint=node0:" in log and "--nnodes=2" in log

    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt"))
    assert ckpts == ["step_000000004.pt", "step_000000008.pt"]
    assert [s for s, _ in read_scalars(run_dir / "tb")["train/loss"]] == [2, 4, 6, 8]
    assert (run_dir / "metrics.json").is_file()


def _stamp(line: str) -> float:
    """The time of a train.sh line ([2026-11-27T14:36:20]) or a trainer log line (2026-11-27 14:36:43,531)."""
    match = re.search(r"(\d{4}-\d\d-\d\d)[T ](\d\d:\d\d:\d\d)", line)
    assert match, line
    return datetime.strptime(" ".join(match.groups()), "%Y-%m-%d %H:%M:%S").timestamp()


def test_usr1_checkpoints_requeues_and_resumes_without_gap(slurm_cluster: PrivateSlurm, tmp_path: Path,
                                                            tiny_data: Path) -> None:
    steps = 80
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(run_dir, tiny_data), f"train.steps={steps}", "train.val_every=0", "train.ckpt_every=0",
                 "train.log_every=1", "data.workers=1"]
    job = _submit(slurm_cluster, tmp_path, overrides, {})

    deadline = time.monotonic() + 180
    while " step 10/" not in _log(tmp_path, job):  # training is under way on both nodes
        assert time.monotonic() < deadline, _log(tmp_path, job)[-4000:]
        assert slurm_cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), _log(tmp_path, job)[-4000:]
        time.sleep(0.2)
    slurm_cluster.client(["scancel", "--signal=USR1", "--batch", str(job)])

    info = _wait_done(slurm_cluster, tmp_path, job, timeout=300)
    log = _log(tmp_path, job)
    assert info["Restarts"] == "1", log[-4000:]
    stop = re.search(r"stop signal: checkpoint at step (\d+) written", log)
    resumed = re.search(r"resumed from \S+step_(\d{9})\.pt at step (\d+)", log)
    assert stop and resumed, log[-6000:]
    assert int(resumed.group(1)) == int(stop.group(1)) and 10 <= int(stop.group(1)) < steps
    assert "requeueing job" in log and "restart 1)" in log

    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.pt"))[-1] == f"step_{steps:09d}.pt"
    assert [s for s, _ in read_scalars(run_dir / "tb")["train/loss"]] == list(range(1, steps + 1)), \
        "the loss curve has a gap or a repeat across the requeue"

    requeued = _stamp(next(line for line in log.splitlines() if "requeueing job" in line))
    restarted = _stamp(next(line for line in log.splitlines() if "restart 1)" in line))
    resumed_at = _stamp(next(line for line in log.splitlines() if "resumed from" in line))
    print(f"requeue -> job restarted: {restarted - requeued:.0f} s; -> resumed from the checkpoint: "
          f"{resumed_at - requeued:.0f} s")


def _without(tool: str, farm: Path) -> str:
    """A PATH like this machine's but without `tool` (a container that lacks scontrol)."""
    farm.mkdir()
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        for entry in Path(folder).iterdir():
            if entry.name != tool and not (farm / entry.name).exists():
                (farm / entry.name).symlink_to(entry)
    return f"{farm}:/usr/sbin:/sbin"


def test_usr1_without_scontrol_checkpoints_and_exits_resumable(slurm_cluster: PrivateSlurm, tmp_path: Path,
                                                               tiny_data: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(run_dir, tiny_data), "train.steps=80", "train.val_every=0", "train.ckpt_every=0",
                 "train.log_every=1", "data.workers=1"]
    job = _submit(slurm_cluster, tmp_path, overrides, {"PATH": _without("scontrol", tmp_path / "bin")})
    deadline = time.monotonic() + 180
    while " step 10/" not in _log(tmp_path, job):
        assert time.monotonic() < deadline, _log(tmp_path, job)[-4000:]
        assert slurm_cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), _log(tmp_path, job)[-4000:]
        time.sleep(0.2)
    slurm_cluster.client(["scancel", "--signal=USR1", "--batch", str(job)])
    info = slurm_cluster.wait_job(job, DONE, timeout=180)
    log = _log(tmp_path, job)
    assert info["ExitCode"] == "75:0" and info["Restarts"] == "0", f"{info}\n{log[-4000:]}"
    assert "scontrol not found" in log and "cannot requeue" in log
    stop = re.search(r"stop signal: checkpoint at step (\d+) written", log)
    assert stop, log[-4000:]
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*.pt")] == [f"step_{int(stop.group(1)):09d}.pt"]


def _dry_run(cluster: PrivateSlurm, nodelist: str, **env: str) -> tuple[int, str]:
    """slurm/train.sh with DRY_RUN=1 in a job-like environment on node0 (real scontrol, real resolver)."""
    full = {**os.environ, **cluster.env, "DRY_RUN": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2",
            "SLURM_JOB_NODELIST": nodelist, "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "16",
            "SLURM_SUBMIT_DIR": str(REPO), **env}
    argv = cluster.network.command("node0", ["bash", str(REPO / "slurm/train.sh"), "configs/default.yaml",
                                             "train.steps=5"])
    proc = subprocess.run(argv, env=full, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


def test_train_sh_derives_everything_from_slurm(slurm_cluster: PrivateSlurm) -> None:
    rc, out = _dry_run(slurm_cluster, "node[0-1]", NCCL_SOCKET_IFNAME="ib0")
    assert rc == 0, out
    command = next(line for line in out.splitlines() if "running: " in line).split("running: ", 1)[1]
    assert command.startswith("srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=0 --wait=60 "
                              "--cpus-per-task=16 ")
    for part in ("--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=node0:24242",
                 "--rdzv_id=4242", "SIGUSR1", "-m unetdist.train --config configs/default.yaml train.steps=5"):
        assert part in command, (part, command)
    assert "passing through: NCCL_SOCKET_IFNAME=ib0" in out


def test_train_sh_refuses_a_loopback_head_on_multi_node_jobs(slurm_cluster: PrivateSlurm) -> None:
    rc, out = _dry_run(slurm_cluster, "localhost,node1")
    assert rc == 2 and "resolves to the loopback address 127.0.0.1" in out, out
    assert "running: " not in out
