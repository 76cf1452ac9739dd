"""A run stopped on 2 ranks and resumed on 1 (same global batch), then on 2 again, keeps the loss curve.

The data order depends on the global batch, not on the world size (unetdist/data/order.py), so with
GroupNorm (per-sample statistics) and per-sample losses the resumed run computes, step for step, the
updates of the unbroken 2-rank run; only floating-point summation order differs (fp32, 1e-5 relative).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPO, free_port, run_cmd, tiny_overrides
from tests.e2e.tb import read_scalars

pytestmark = pytest.mark.slow

STEPS = 9


def _train(run_dir: Path, data: Path, ranks: int, *extra: str) -> str:
    launcher = [PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}"]
    cmd = [*(launcher if ranks > 1 else [PYTHON]), "-m", "unetdist.train", "--config", str(REPO / "configs/default.yaml"),
           *tiny_overrides(run_dir, data), f"train.steps={STEPS}", "train.log_every=1", "train.val_every=0",
           "train.ckpt_every=0", "model.norm=group", "train.precision=fp32", "data.workers=1",
           "data.augment.rotate_p=0.5", *extra]
    proc = run_cmd(cmd, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_stopped_on_2_ranks_resumed_on_1_then_on_2_gives_the_unbroken_loss_curve(tmp_path: Path,
                                                                                  tiny_data: Path) -> None:
    unbroken, elastic = tmp_path / "unbroken", tmp_path / "elastic"
    _train(unbroken, tiny_data, 2, "data.batch_size=4")
    # the elastic run sets the global batch once; each launch derives its per-rank batch (4, 8, 4)
    _train(elastic, tiny_data, 2, "data.global_batch=8", "run.stop_at=3")
    log = _train(elastic, tiny_data, 1, "data.global_batch=8", "run.stop_at=6")
    assert "the data order continues unchanged" in log
    _train(elastic, tiny_data, 2, "data.global_batch=8")

    a = read_scalars(unbroken / "tb")["train/loss"]
    b = read_scalars(elastic / "tb")["train/loss"]
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, STEPS + 1))
    for (step, va), (_, vb) in zip(a, b):
        assert vb == pytest.approx(va, rel=1e-5), f"step {step}: unbroken {va} vs elastic {vb}"
    assert a[-1][1] < a[0][1]  # it learned: the comparison is between changing values
