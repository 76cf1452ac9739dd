"""Benchmark figures that need no timing: device peaks, memory headroom, rows, presets, the report check."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from unetdist import apply_activation_checkpointing
from unetdist.bench.data import Lever
from unetdist.bench.memory import headroom_meta, saved_bytes_meta
from unetdist.model.peak import lookup_gpu_peak, peak_flops
from unetdist.bench.presets import PRESETS, resolve_preset
from unetdist.bench.report import SCHEMA, check_report, format_table
from unetdist.bench.rows import FIGURES, make_row
from unetdist.bench.run import selected_sections
from unetdist.bench.timing import SavedTensorBytes, StepTimes, state_bytes
from unetdist.model import UNet
from unetdist.model.flops import train_step_flops
from unetdist.train.metrics import segmentation_loss

CPU = torch.device("cpu")


@pytest.mark.parametrize("name, key, bf16", [
    ("NVIDIA H100 80GB HBM3", "h100", 989.4e12), ("NVIDIA H100 PCIe", "h100 pcie", 756.5e12),
    ("NVIDIA H200", "h200", 989.4e12), ("NVIDIA GH200 480GB", "gh200", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", "a100", 312e12), ("NVIDIA L40S", "l40s", 362.1e12), ("NVIDIA L4", "l4", 121e12),
])
def test_known_gpu_peaks(name: str, key: str, bf16: float) -> None:
    found = lookup_gpu_peak(name)
    assert found is not None and found[0] == key and found[1].bf16 == pytest.approx(bf16)
    assert found[1].bf16 > found[1].tf32 >= found[1].fp32 > 0


def test_unknown_gpu_is_measured_not_guessed() -> None:
    assert lookup_gpu_peak("NVIDIA A10G") is None
    assert lookup_gpu_peak("Some Future Accelerator") is None


def test_cpu_peak_is_measured_once_per_process() -> None:
    first = peak_flops("cpu", torch.float32)
    assert first > 1e8  # any CPU of this decade does more than 0.1 GFLOP/s
    assert peak_flops(CPU, torch.float32) == first  # cached: the same number, not a new measurement


def test_meta_saved_bytes_equal_real_saved_bytes() -> None:
    """The meta-device count (used at 512x512 for the default model) is what real tensors save."""
    torch.manual_seed(0)
    for policy in ("none", "highres", "all"):
        model = apply_activation_checkpointing(UNet(base_width=4, depth=4), policy).train()
        x, target = torch.randn(2, 1, 32, 32), torch.randint(0, 2, (2, 32, 32))
        with SavedTensorBytes(model) as saved:
            segmentation_loss(model(x), target, 1.0)
        assert saved_bytes_meta(4, 32, 2, policy) == (saved.bytes, state_bytes(model)), policy


def test_headroom_grows_with_checkpointing_and_is_linear_in_batch() -> None:
    one, two, three = (saved_bytes_meta(64, 512, b, "none")[0] for b in (1, 2, 3))
    assert two - one == three - two > 0
    memory = headroom_meta(PRESETS["cpu"], budget_gb=80.0)
    batches = {p: memory["policies"][p]["max_batch"] for p in ("none", "highres", "all")}
    assert 0 < batches["none"] < batches["highres"] < batches["all"]
    assert memory["ratio_all_vs_none"] >= 3.0  # the target: full checkpointing at least triples the batch


def _row(**kwargs: object) -> dict:
    times = StepTimes([0.5, 0.25, 1.0])
    args = dict(group="levers", mode="compute", times=times, batch=4, tile=64, base_width=8, precision="fp32",
                channels_last=False, checkpointing="all", compile=False, device=CPU, memory_gb=0.1,
                memory_method="test")
    args.update(kwargs)
    return make_row("ours fp32", **args)


def test_row_figures() -> None:
    row = _row(world_size=2)
    assert row["step_s"] == 0.5 and row["images_per_s_per_device"] == 8.0 and row["images_per_s"] == 16.0
    assert row["megapixels_per_s_per_device"] == pytest.approx(8 * 64 * 64 / 1e6)
    assert row["train_flops_per_step"] == train_step_flops(64, 64, 4, base_width=8, policy="all")
    # checkpointing=all recomputes: HFU counts what ran, MFU only what the model needs (1.333x less here)
    assert row["hfu"] == pytest.approx(row["train_flops_per_step"] / 0.5 / peak_flops(CPU, torch.float32))
    assert row["model_flops_per_step"] == train_step_flops(64, 64, 4, base_width=8, policy="none")
    assert row["mfu"] == pytest.approx(row["model_flops_per_step"] / 0.5 / peak_flops(CPU, torch.float32))
    assert row["hfu"] > 1.3 * row["mfu"]
    assert all(row[f] > 0 for f in FIGURES)


def _report() -> dict:
    return {"schema": SCHEMA, "preset": "tiny", "machine": {"device": "cpu", "device_name": "x", "torch": "2"},
            "model": {"base_width": 8}, "settings": {"tile": 64, "batch": 4},
            "peak_flops": {"fp32": 1e9, "source": "t"},
            "rows": [_row()], "comparisons": [{"name": "r", "ratio": 1.5}], "skipped": [], "sections": ["levers"],
            "ddp": None, "memory": None}


def test_report_check_and_table() -> None:
    report = _report()
    assert check_report(report) == []
    assert "ours fp32" in format_table(report) and "1.50x" in format_table(report)
    broken = copy.deepcopy(report)
    broken["rows"][0]["mfu"] = 0.0
    broken["comparisons"][0]["ratio"] = math.nan
    assert len(check_report(broken)) == 2
    del broken["rows"]
    assert check_report(broken) == ["missing key 'rows'"]


def test_presets_sections_and_levers() -> None:
    assert resolve_preset("auto", CPU).name == "cpu"
    assert resolve_preset("tiny", CPU, batch=2, tile=None).batch == 2
    with pytest.raises(ValueError, match="unknown bench preset"):
        resolve_preset("huge", CPU)
    assert selected_sections(None, "ddp") == ["reference", "levers", "memory"]
    assert selected_sections("memory,levers", None) == ["memory", "levers"]
    with pytest.raises(ValueError, match="unknown bench section"):
        selected_sections("speed", None)
    assert Lever("bf16", True, "all", True).label == "bf16+channels_last+compile ckpt=all"


def test_train_step_flops_for_a_config() -> None:
    """What the training loop calls for train/mfu: the config's model section, norm ignored."""
    from unetdist.config import ModelConfig
    from unetdist.model.flops import train_step_flops_for

    model = ModelConfig(base_width=16, norm="group").hparams()
    assert train_step_flops_for(model, 64, 96, 3, "highres") == train_step_flops(
        64, 96, 3, base_width=16, policy="highres")


def test_gpu_headroom_search(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The GPU path's fit-then-verify search, with the allocator replaced by a linear memory model."""
    from unetdist.bench import memory

    gib = 2**30
    per_sample = {"none": 1.0 * gib, "highres": 0.4 * gib, "all": 0.2 * gib}
    fixed = 0.5 * gib

    class FakeTrainer:
        def __init__(self, policy: str) -> None:
            self.policy = policy

    def fake_peak(trainer: FakeTrainer, device: torch.device, batch: int, tile: int) -> float | None:
        used = fixed + per_sample[trainer.policy] * batch * 1.05  # 5% more than the fit predicts: step down
        return None if used > 20 * gib else used

    monkeypatch.setattr(memory, "_peak_step", fake_peak)
    monkeypatch.setattr(memory, "build_our_trainer", lambda cfg, env, lever: FakeTrainer(lever.checkpointing))
    result = memory.headroom_cuda(PRESETS["gpu"], tmp_path, tmp_path, CPU, budget_gb=16.0, lever=Lever("bf16", True))
    for policy, figures in result["policies"].items():
        assert figures["verified_peak_gb"] <= 16.0
        assert fixed + per_sample[policy] * (figures["max_batch"] + 1) * 1.05 > 16 * gib * 0.9  # close to the limit
    assert result["ratio_all_vs_none"] > 3


def test_cpu_seconds_ratio_next_to_the_wall_clock_one() -> None:
    from unetdist.bench.rows import ratio

    times = StepTimes()
    for wall, cpu in ((2.0, 0.30), (0.5, 0.28), (9.0, 0.29)):  # a loaded machine: wall-clock all over the place
        times.add(wall, 0.0, cpu)
    ours = make_row("ours", group="reference", mode="compute", times=times, batch=4, tile=64, base_width=8,
                    precision="fp32", channels_last=True, checkpointing="none", compile=False, device=CPU,
                    memory_gb=0.1, memory_method="test")
    ref = _row(times=StepTimes([1.0, 1.0], [0.0, 0.0], [0.58, 0.58]))
    assert ours["cpu_s"] == 0.29 and ref["cpu_s"] == 0.58
    found = ratio([ours, ref], "ours", "ours fp32", "ours / ref")
    assert found is not None and found["ratio"] == 0.5 and found["ratio_cpu"] == 2.0
    assert "CPU time: 2.00x" in format_table({**_report_stub(), "comparisons": [found]})
    assert "ratio_cpu" not in (ratio([_row(), _row()], "ours fp32", "ours fp32", "same") or {})  # no CPU times


def _report_stub() -> dict:
    return {"preset": "tiny", "machine": {"device": "cpu", "cpu": "test", "torch": "x"}, "model": {"base_width": 8},
            "settings": {"tile": 64, "batch": 4}, "rows": [], "comparisons": [], "ddp": None, "memory": None,
            "skipped": []}
