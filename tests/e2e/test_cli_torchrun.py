"""Under a real 2-process torchrun, a configuration mistake is one line, printed once (by rank 0), exit 2.

Why: every rank used to print its own copy (or its own traceback), burying the one line that matters
in N copies; and the launch scripts must see exit status 2 to know that restarting would not help.
"""

from __future__ import annotations

import pytest

from tests.conftest import PYTHON, free_port, run_cmd

pytestmark = pytest.mark.slow


def test_config_error_is_printed_once_under_torchrun() -> None:
    proc = run_cmd([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                    "-m", "unetdist.train", "train.stepz=3"], timeout=300, env={"OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    ours = [line for line in out.splitlines() if "unknown config key" in line]
    assert ours == ["unetdist train: unknown config key 'train.stepz'; did you mean 'train.steps'?"], out[-3000:]
    assert "exitcode  : 2" in out or "exitcode: 2" in out, out[-3000:]  # torchrun's summary of the failed workers
    assert "unetdist/config.py" not in out, "a user's mistake is no traceback: " + out[-3000:]


def test_rank_one_stays_silent_about_a_config_error() -> None:
    """The same check without torchrun's timing (it may stop rank 1 before rank 1 gets to print)."""
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    proc = run_cmd([PYTHON, "-m", "unetdist.train", "train.stepz=3"], timeout=120, env=env)
    assert proc.returncode == 2 and proc.stderr == "", proc.stderr
