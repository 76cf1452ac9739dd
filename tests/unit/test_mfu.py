"""What MFU divides by and what it counts: the peak for the run's precision, model FLOPs vs hardware FLOPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unetdist.model.flops import train_step_flops_for
from unetdist.model.peak import lookup_gpu_peak, precision_key
from unetdist.train.logging import Throughput, peak_memory_gb, step_flops_per_image

CPU = torch.device("cpu")


@pytest.mark.parametrize(("name", "key"), [
    ("NVIDIA GB200", "gb200"), ("NVIDIA B200", "b200"), ("NVIDIA GH200 480GB", "gh200"),
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA A10", "a10"),
])
def test_gpu_names_match_whole_model_names(name: str, key: str) -> None:
    found = lookup_gpu_peak(name)
    assert found is not None and found[0] == key, found


def test_gb200_is_not_a_b200() -> None:
    gb200, b200 = lookup_gpu_peak("NVIDIA GB200"), lookup_gpu_peak("NVIDIA B200")
    assert gb200 is not None and b200 is not None and gb200[1].bf16 > b200[1].bf16


def test_fp32_peak_is_tf32_only_on_cuda_while_cudnn_may_use_it() -> None:
    assert precision_key(torch.float32, "cuda", cudnn_tf32=True) == "tf32"   # measured with TF32 matmuls too
    assert precision_key(torch.float32, "cuda", cudnn_tf32=False) == "fp32"
    assert precision_key(torch.float32, "cpu", cudnn_tf32=True) == "fp32"    # no TF32 on a CPU
    assert precision_key(torch.bfloat16, "cuda", cudnn_tf32=True) == "bf16"
    assert precision_key(torch.float16, "cuda", cudnn_tf32=False) == "bf16"  # same 16-bit tensor-core peak
    with pytest.raises(ValueError, match="no peak for dtype"):
        precision_key(torch.int8, "cuda", cudnn_tf32=True)


def test_mfu_counts_model_flops_hfu_counts_recomputation() -> None:
    model = {"in_channels": 1, "num_classes": 2, "base_width": 8, "depth": 3, "bilinear": False, "norm": "batch"}
    plain = step_flops_per_image(model, 64, 64, "none")
    assert plain[0] == plain[1] == train_step_flops_for(model, 64, 64, 1, "none")
    model_flops, hardware = step_flops_per_image(model, 64, 64, "all")
    assert model_flops == plain[0] and hardware == train_step_flops_for(model, 64, 64, 1, "all") > model_flops


def test_peak_memory_is_per_interval_not_per_process() -> None:
    throughput = Throughput(1, CPU)
    big = np.ones(384 * 2**20 // 8)  # 384 MB, touched, then freed (as validation's activations are)
    del big
    first = throughput.report()["peak_memory_gb"]  # this interval held it
    second = throughput.report()["peak_memory_gb"]  # the next did not
    assert first - second > 0.3, (first, second)
    assert second == pytest.approx(peak_memory_gb(CPU), abs=0.05)
