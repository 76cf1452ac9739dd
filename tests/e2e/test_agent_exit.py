"""The launch scripts' exit status says what happened: 75 after a stop signal, 2 (never restarted) on bad settings.

Real `launch/local.sh` runs (torchrun's agent through unetdist.parallel.agent), elastic restarts on.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.cluster.procs import kill_tree
from tests.conftest import REPO, tiny_overrides
from unetdist.parallel.agent import exit_status

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "RDZV_ENDPOINT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "NPROC_PER_NODE": "2", "MAX_RESTARTS": "3", "SHUTDOWN_TIMEOUT": "60"}


def _local(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return [str(REPO / "launch/local.sh"), str(REPO / "configs/default.yaml"), *tiny_overrides(run_dir, data),
            "train.log_every=1", "train.val_every=0", "train.ckpt_every=0", "data.workers=0", *extra]


def test_usr1_to_the_agent_exits_resumable(tmp_path: Path, tiny_data: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_local(run_dir, tiny_data, "train.steps=400"), cwd=REPO, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if " step 3/" in line:
                proc.send_signal(signal.SIGUSR1)  # the script execs the agent: this is `kill -USR1 <agent>`
                break
        rest, _ = proc.communicate(timeout=180)
    finally:
        kill_tree(proc.pid)
    output = "".join(lines) + rest
    assert proc.returncode == 75, output[-4000:]
    assert (run_dir / "checkpoints").is_dir() and list((run_dir / "checkpoints").glob("step_*.pt")), output[-2000:]
    assert "Traceback" not in output, output[-4000:]


def test_configuration_error_is_not_restarted(tmp_path: Path, tiny_data: Path) -> None:
    proc = subprocess.run(_local(tmp_path / "run", tiny_data, "model.in_channels=3", "train.steps=4"), cwd=REPO,
                          env=_env(), text=True, capture_output=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-4000:]
    printed = output.count("model.in_channels=3; set model.in_channels=1")  # at most once per rank per attempt
    assert 1 <= printed <= 2, f"the group of 2 ranks printed the error {printed} times (restarted):\n{output[-4000:]}"


def test_exit_status_from_worker_codes() -> None:
    assert exit_status({0: 75, 1: 75}) == 75
    assert exit_status({0: 75, 1: 0}) == 75   # a rank that had just finished
    assert exit_status({0: 2, 1: -15}) == 2   # rank 0 refused the settings, torchrun stopped the other
    assert exit_status({0: 75, 1: 1}) is None  # a real failure keeps torchrun's report
    assert exit_status({0: 1}) is None
    assert exit_status({}) is None
