"""Validation Dice/IoU over 2 ranks equal the single-process figures on all the data (global pixel counts)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.multiproc.spawn import spawn
from unetdist.train.metrics import ConfusionCounter


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    target = torch.randint(0, 3, (5, 16, 16), generator=gen)
    logits = torch.randn(5, 3, 16, 16, generator=gen) + 2.0 * torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2)
    return logits, target


SPLIT = {0: slice(0, 1), 1: slice(1, 5)}  # uneven on purpose: a mean of per-rank scores would differ


def _worker(out: str) -> None:
    from unetdist.parallel.env import destroy_distributed, init_distributed

    env = init_distributed()
    try:
        logits, target = _data()
        counter = ConfusionCounter(3, env.device)
        part = SPLIT[env.rank]
        counter.update(logits[part], target[part], torch.tensor(float(len(target[part]))))
        local = counter.summary()
        counter.all_reduce(env)
        if env.is_main:
            Path(out).write_text(json.dumps({"global": counter.summary(), "local0": local}))
        else:
            Path(out + ".1").write_text(json.dumps(local))
    finally:
        destroy_distributed()


def test_global_sums_not_mean_of_rank_means(tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    spawn(_worker, 2, str(out))
    result = json.loads(out.read_text())
    local1 = json.loads(Path(str(out) + ".1").read_text())
    logits, target = _data()
    single = ConfusionCounter(3, torch.device("cpu"))
    single.update(logits, target, torch.tensor(5.0))
    expected = single.summary()
    for key in ("dice/class_1", "iou/class_2", "dice/foreground", "samples"):
        assert abs(result["global"][key] - expected[key]) < 1e-12, key
    mean_of_means = (result["local0"]["dice/class_1"] + local1["dice/class_1"]) / 2
    assert abs(mean_of_means - expected["dice/class_1"]) > 1e-4
