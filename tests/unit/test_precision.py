"""The autocast dtype per device, from the compute capability given as a value (GPUs we do not have)."""

from __future__ import annotations

import pytest
import torch

from unetdist.parallel.precision import choose_amp_dtype, choose_inference_dtype, native_bf16, resolve_precision

H100, A100, L4, V100, T4 = (9, 0), (8, 0), (8, 9), (7, 0), (7, 5)


@pytest.mark.parametrize(("capability", "native"), [(H100, True), (A100, True), (L4, True), (V100, False),
                                                    (T4, False), (None, False)])
def test_bf16_hardware_from_compute_capability(capability, native: bool) -> None:
    assert native_bf16(capability) is native


@pytest.mark.parametrize(("device", "capability", "expected"), [
    ("cuda", H100, torch.bfloat16),
    ("cuda", A100, torch.bfloat16),
    ("cuda", V100, torch.float16),   # bf16 is emulated there (torch.cuda.is_bf16_supported() says yes)
    ("cuda", T4, torch.float16),
    ("cpu", None, None),
])
def test_training_auto(device: str, capability, expected) -> None:
    assert choose_amp_dtype("auto", device, capability) is expected


def test_training_explicit_choices_are_kept() -> None:
    assert choose_amp_dtype("fp32", "cuda", H100) is None
    assert choose_amp_dtype("bf16", "cuda", V100) is torch.bfloat16  # asked for explicitly: honoured
    assert choose_amp_dtype("fp16", "cuda", H100) is torch.float16
    assert choose_amp_dtype("fp16", "cpu", None) is torch.float16  # CPU autocast + GradScaler("cpu") work (tests)
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        choose_amp_dtype("half", "cuda", H100)


@pytest.mark.parametrize(("device", "capability", "expected"), [
    ("cuda", H100, torch.bfloat16),
    ("cuda", V100, None),   # no emulated bf16 for prediction: fp32 (fp16 could overflow without loss scaling)
    ("cpu", None, None),
])
def test_prediction_auto(device: str, capability, expected) -> None:
    assert choose_inference_dtype("auto", device, capability) is expected
    assert choose_inference_dtype("fp32", device, capability) is None
    assert choose_inference_dtype("bf16", device, capability) is torch.bfloat16


def test_this_machine() -> None:
    assert resolve_precision("auto", torch.device("cpu")) is None
