"""The data-parallel efficiency model of docs/scaling.md: its inputs are exact and its limits are right."""

from __future__ import annotations

import pytest

from unetdist.bench.scaling import (
    FIRST_BUCKET_BYTES,
    INTERCONNECTS,
    Interconnect,
    buckets,
    efficiency,
    exposed_seconds,
    h100_step_s,
    measured_efficiency_model,
    stage_param_bytes,
)
from unetdist.model.flops import forward_flops_by_stage


def test_gradient_sizes_are_the_issues() -> None:
    assert sum(stage_param_bytes(64, 4).values()) == 4 * 31_036_546  # 124 MB fp32
    assert sum(stage_param_bytes(64, 2).values()) == 2 * 31_036_546  # 62 MB bf16-compressed


def test_buckets_cover_every_gradient_in_ddp_order() -> None:
    sizes = stage_param_bytes(64, 4)
    found = buckets(sizes, 25 * 2**20)
    assert sum(size for size, _ in found) == sum(sizes.values())
    assert found[0][0] >= FIRST_BUCKET_BYTES and found[0][0] < 2 * FIRST_BUCKET_BYTES
    assert all(size <= 25 * 2**20 for size, _ in found[1:])
    assert found[-1][1] == "inc"  # the last bucket waits for the first stage, the end of backward
    assert len(found) == 6


def test_exposed_time_limits() -> None:
    flops = forward_flops_by_stage(512, 512, 16)
    sizes = stage_param_bytes(64, 4)
    assert exposed_seconds(0.05, flops, sizes, 25 * 2**20, lambda size: 0.0) == 0.0
    # communication far slower than backward: almost all of it is exposed
    total_comm = 10.0
    exposed = exposed_seconds(0.05, flops, sizes, 25 * 2**20, lambda size: total_comm * size / sum(sizes.values()))
    assert total_comm - 0.05 < exposed <= total_comm


def test_efficiency_orders() -> None:
    step = h100_step_s(0.45)
    assert efficiency(1, INTERCONNECTS[0], step_s=step) == 1.0
    free = Interconnect("ideal", intra=1e18, node=1e18, latency=0.0, hop=0.0)
    assert efficiency(512, free, step_s=step, sync_bn=False) == pytest.approx(1.0)
    fast, slow = INTERCONNECTS[0], INTERCONNECTS[-1]
    for gpus in (16, 64, 512):
        assert efficiency(gpus, fast, step_s=step) > efficiency(gpus, slow, step_s=step)
        assert efficiency(gpus, slow, step_s=step, grad_bytes=2) > efficiency(gpus, slow, step_s=step, grad_bytes=4)
        assert efficiency(gpus, slow, step_s=step, sync_bn=False) > efficiency(gpus, slow, step_s=step)
    assert efficiency(64, slow, step_s=step) < efficiency(16, slow, step_s=step)


def test_model_fed_with_measurements() -> None:
    """An all-reduce as long as the step: at most backward's two thirds of it can hide."""
    gradient = sum(stage_param_bytes(16, 4).values())
    eff = measured_efficiency_model(1.0, 1.0, gradient, tile=128, batch=8, base_width=16)
    assert 0.5 <= eff <= 1 / (1 + 1 / 3) + 1e-9
    assert measured_efficiency_model(1.0, 1e-9, gradient, tile=128, batch=8, base_width=16) == pytest.approx(1.0)
