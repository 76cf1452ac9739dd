"""Levers of the training step that must not change the numbers: fused optimizers, threads per rank,
and torch.compile applied by the parallel layer (compiled steps agree with eager ones, and
BatchNorm-safe activation checkpointing still updates running statistics once per step)."""

from __future__ import annotations

import pytest
import torch

from unetdist.config import TrainConfig, load_config
from unetdist.parallel.env import DistEnv, cpu_threads_per_rank
from unetdist.parallel.parallelize import compile_mode
from unetdist.train.optim import build_optimizer

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_optimizer_gives_the_same_update(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 8, 3, 3), (16,), (2, 16, 1, 1), (2,)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) * 10.0 ** -k for s in shapes] for k in range(4)]  # scales 1 .. 1e-3
    train = TrainConfig(optimizer=name, lr=0.01, weight_decay=0.01, momentum=0.9)
    results = []
    for fused in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = build_optimizer(params, train, fused=fused)
        assert bool(optimizer.defaults.get("fused")) is fused
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        results.append([p.detach() for p in params])
    for loop, fused in zip(*results):
        torch.testing.assert_close(fused, loop, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(results[0], start))  # the steps moved the parameters


def test_threads_per_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert cpu_threads_per_rank(1) is None  # alone: torch's default, every core
    assert cpu_threads_per_rank(4) == 4 and cpu_threads_per_rank(3) == 5 and cpu_threads_per_rank(32) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads_per_rank(4) is None  # the user's choice stands


def test_compile_setting() -> None:
    assert [compile_mode(v) for v in (False, True, "default", "max-autotune")] == [
        None, "default", "default", "max-autotune"]
    assert load_config(None, ["train.compile=max-autotune"]).train.compile == "max-autotune"
    assert load_config(None, ["train.compile=false"]).train.compile is False
    with pytest.raises(ValueError, match="train.compile"):
        load_config(None, ["train.compile=fast"])


def _trainer(overrides: list[str]):  # type: ignore[no-untyped-def]
    from unetdist.train.trainer import build_trainer

    cfg = load_config(None, ["model.base_width=4", "model.depth=2", "train.optimizer=sgd", "train.momentum=0.9",
                             "train.lr=0.05", "train.warmup_steps=0", "train.grad_clip=0", *overrides])
    return build_trainer(cfg, DistEnv(0, 1, 0, 1, CPU))


@pytest.mark.slow
def test_compiled_checkpointed_steps_agree_with_eager(one_thread: None) -> None:
    """Compile + full checkpointing vs eager without: same losses, parameters and BatchNorm statistics
    (counted once per step), same state-dict keys. One compilation keeps this short on 2 cores."""
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        image = torch.randn(2, 1, 16, 16, generator=gen)
        batches.append({"image": image, "label": (image[:, 0] > 0.2).long()})
    eager = _trainer([])
    compiled = _trainer(["train.compile=default", "train.activation_checkpointing=all"])
    losses = {}
    for name, trainer in (("eager", eager), ("compiled", compiled)):
        losses[name] = [float(trainer.train_step(b)["loss"]) for b in batches]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5, abs=1e-6)
    a, b = eager.module.state_dict(), compiled.module.state_dict()
    assert list(a) == list(b)  # compile and checkpointing leave module names alone
    moved = 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
        if key.endswith("num_batches_tracked"):
            assert int(b[key]) == 2, f"{key}: BatchNorm counted {int(b[key])} updates in 2 steps"
        moved += int(not key.endswith("num_batches_tracked"))
    assert moved > 10
    assert compiled.module._compiled_call_impl is not None  # it really ran compiled
