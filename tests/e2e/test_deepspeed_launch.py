"""The DeepSpeed backend launched for real: torchrun with stop/resume, and the `deepspeed` launcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, free_port, run_cmd, tiny_overrides
from tests.e2e.tb import hparams, read_scalars

pytestmark = pytest.mark.slow

VENV_BIN = Path(PYTHON).parent


def _args(run_dir: Path, data: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs/default.yaml"), *tiny_overrides(run_dir, data),
            "parallel.backend=deepspeed", "parallel.deepspeed.zero_stage=2", "train.steps=6", "train.log_every=1",
            "train.val_every=3", "train.ckpt_every=0", *extra]


def test_torchrun_deepspeed_stop_and_resume_auto(tmp_path: Path, tiny_data: Path) -> None:
    run_dir = tmp_path / "run"
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "unetdist.train"]
    first = run_cmd([*torchrun[:3], f"--master_port={free_port()}", *torchrun[3:], *_args(run_dir, tiny_data, "run.stop_at=3")],
                    env={"OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000000003"
    second = run_cmd([*torchrun[:3], f"--master_port={free_port()}", *torchrun[3:], *_args(run_dir, tiny_data)],
                     env={"OMP_NUM_THREADS": "1"})
    assert second.returncode == 0, second.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000000006"

    scalars = read_scalars(run_dir / "tb")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    for tag in ("train/lr", "train/grad_norm", "train/images_per_s", "val/dice/foreground", "val/iou/class_1"):
        assert tag in scalars, tag
    assert all(v == v and v > 0 for _, v in scalars["train/grad_norm"]), "DeepSpeed grad norm missing (NaN)"
    hp = hparams(run_dir / "tb")
    assert hp["backend"] == "deepspeed" and hp["zero_stage"] == 2.0 and hp["world_size"] == 2.0

    export = run_cmd([str(VENV_BIN / "unetdist"), "export", "--model", str(run_dir),
                      "--out", str(tmp_path / "model.pt")])
    assert export.returncode == 0, export.stderr[-2000:]
    assert "step_000000006" in export.stdout


def test_deepspeed_launcher_runs_two_processes(tmp_path: Path, tiny_data: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cmd([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", f"--master_port={free_port()}",
                    "--module", "unetdist.train", *_args(run_dir, tiny_data, "train.steps=2", "train.val_every=2")],
                   env={"OMP_NUM_THREADS": "1", "PATH": f"{VENV_BIN}:/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000000002"
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step_000000002").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert hparams(run_dir / "tb")["world_size"] == 2.0
