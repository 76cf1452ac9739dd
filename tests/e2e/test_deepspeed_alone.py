"""DeepSpeed with one process and no launcher (a 1-GPU machine, `parallel.backend=deepspeed` alone), and fp16.

DeepSpeed's engine always talks through a process group; with one process we must create a
group of one ourselves. fp16 runs through DeepSpeed's `torch_autocast` with its GradScaler:
fp32 weights, float16 convolutions, dynamic loss scaling, like the DDP engine's fp16.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.conftest import PYTHON, REPO, run_cmd, tiny_overrides
from tests.e2e.tb import read_scalars

pytestmark = pytest.mark.slow

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _alone_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS} | {"OMP_NUM_THREADS": "1",
                                                                            "PYTHONUNBUFFERED": "1"}


def test_deepspeed_trains_alone_without_a_launcher(tmp_path: Path, tiny_data: Path) -> None:
    import subprocess

    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [PYTHON, "-m", "unetdist.train", "--config", str(REPO / "configs/default.yaml"),
         *tiny_overrides(run_dir, tiny_data), "parallel.backend=deepspeed", "parallel.deepspeed.zero_stage=2",
         "train.precision=fp16", "train.steps=4", "train.log_every=1", "train.val_every=4", "train.ckpt_every=0"],
        cwd=REPO, env=_alone_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000000004"
    scalars = read_scalars(run_dir / "tb")
    scales = [value for _, value in scalars["train/loss_scale"]]
    assert len(scales) == 4 and all(s > 1 for s in scales), scales  # DeepSpeed's dynamic scaler, read back


def _fp16_worker(_index: int, out: str) -> None:
    for key in LAUNCHER_VARS:
        os.environ.pop(key, None)
    import torch

    from unetdist.config import load_config
    from unetdist.parallel.env import destroy_distributed, init_distributed
    from unetdist.train.trainer import build_trainer

    torch.set_num_threads(1)
    base = ["model.base_width=4", "model.depth=2", "train.lr=0.01", "train.warmup_steps=2", "train.steps=8",
            "train.grad_clip=1.0", "data.batch_size=4", "run.seed=3", "train.precision=fp16",
            "train.channels_last=false"]  # DeepSpeed keeps contiguous weights: the same kernels on both sides
    gen = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(8):
        image = torch.randn(4, 1, 32, 32, generator=gen)
        batches.append({"image": image, "label": (image[:, 0] > 0.2).long()})
    env = init_distributed(group_for_one=True)
    try:
        result = {}
        for name, extra in (("ddp", []), ("zero0", ["parallel.backend=deepspeed", "parallel.deepspeed.zero_stage=0"]),
                            ("zero2", ["parallel.backend=deepspeed", "parallel.deepspeed.zero_stage=2"])):
            trainer = build_trainer(load_config(None, base + extra), env)
            outs = [trainer.train_step(b) for b in batches]
            result[name] = {"loss": [float(o["loss"]) for o in outs], "scale": [float(o["loss_scale"]) for o in outs],
                            "amp": str(trainer.engine.amp_dtype)}
        Path(out).write_text(json.dumps(result))
    finally:
        destroy_distributed()


def test_fp16_deepspeed_matches_the_ddp_engine(tmp_path: Path) -> None:
    out = tmp_path / "fp16.json"
    mp.start_processes(_fp16_worker, args=(str(out),), nprocs=1, join=True, start_method="spawn")
    r = json.loads(out.read_text())
    # ZeRO-2 keeps and reduces gradients in float16 under autocast (ZeRO-0 and DDP in fp32): a little more rounding.
    for name, rtol in (("zero0", 2e-3), ("zero2", 2e-2)):
        assert r[name]["amp"] == "torch.float16"
        assert r[name]["scale"] == r["ddp"]["scale"], (name, r)  # the same dynamic scaler, read the same way
        for ours, ref in zip(r[name]["loss"], r["ddp"]["loss"]):
            assert abs(ours - ref) <= rtol * abs(ref), (name, r[name]["loss"], r["ddp"]["loss"])
    assert r["ddp"]["loss"][-1] < r["ddp"]["loss"][0]
