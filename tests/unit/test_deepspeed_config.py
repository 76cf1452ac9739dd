"""The generated DeepSpeed config, and the errors a user gets before any process group exists."""

from __future__ import annotations

import pytest

from tests.conftest import PYTHON, REPO, run_cmd
from unetdist.config import ConfigError, load_config
from unetdist.parallel.deepspeed_config import check_deepspeed_version, deepspeed_config


def _cfg(*overrides: str):
    return load_config(None, ["parallel.backend=deepspeed", "data.batch_size=8", *overrides])


def test_batch_arithmetic_comes_from_our_keys() -> None:
    ds = deepspeed_config(_cfg("train.grad_accum=2", "parallel.deepspeed.zero_stage=2", "train.grad_clip=0.5"), 4)
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2
    assert "fp16" not in ds and "torch_autocast" not in ds


def test_precision_sections() -> None:
    assert deepspeed_config(_cfg("train.precision=bf16"), 1)["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    # fp16 is autocast too (fp32 weights meet fp32 images; DeepSpeed adds its GradScaler), never the weight-casting section
    fp16 = deepspeed_config(_cfg("train.precision=fp16"), 1)
    assert fp16["torch_autocast"] == {"enabled": True, "dtype": "float16"} and "fp16" not in fp16


@pytest.mark.parametrize(("device", "capability", "expected"), [
    ("cuda", (9, 0), "bfloat16"),   # H100: bf16 hardware
    ("cuda", (8, 0), "bfloat16"),   # A100
    ("cuda", (7, 0), "float16"),    # V100: bf16 only emulated, so fp16 with loss scaling
    ("cuda", (7, 5), "float16"),    # T4
    ("cpu", None, None),            # auto on CPU: fp32
])
def test_auto_precision_follows_the_device(device: str, capability, expected) -> None:
    ds = deepspeed_config(_cfg("train.precision=auto"), 1, device, capability)
    assert ds.get("torch_autocast", {}).get("dtype") == expected


def test_too_old_deepspeed_refuses_autocast_runs() -> None:
    bf16 = deepspeed_config(_cfg("train.precision=bf16"), 1)
    with pytest.raises(ConfigError, match=r"DeepSpeed 0.16.9 ignores the torch_autocast .* deepspeed>=0.17.2"):
        check_deepspeed_version("0.16.9", bf16)
    check_deepspeed_version("0.17.2", bf16)
    check_deepspeed_version("0.15.0", deepspeed_config(_cfg("train.precision=fp32"), 1))  # fp32 needs no autocast


def test_deepspeed_optimizer_and_scheduler() -> None:
    ds = deepspeed_config(_cfg("parallel.deepspeed.optimizer=deepspeed", "parallel.deepspeed.scheduler=deepspeed",
                               "train.lr=0.002", "train.steps=100", "train.warmup_steps=10"), 2)
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 0.002, "weight_decay": 0.0001}}
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert ds["scheduler"]["params"]["total_num_steps"] == 100


def test_extra_keys_merge_deeply() -> None:
    ds = deepspeed_config(_cfg("parallel.deepspeed.extra.zero_optimization.contiguous_gradients=true",
                               "parallel.deepspeed.extra.prescale_gradients=false"), 2)
    assert ds["zero_optimization"]["contiguous_gradients"] is True
    assert ds["zero_optimization"]["stage"] == 0
    assert ds["prescale_gradients"] is False


def test_unknown_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown DeepSpeed key 'parallel.deepspeed.extra.train_batch_sise'"):
        deepspeed_config(_cfg("parallel.deepspeed.extra.train_batch_sise=16"), 2)
    with pytest.raises(ConfigError, match=r"(?s)parallel.deepspeed.extra.zero_optimization.*stagee.*not permitted"):
        deepspeed_config(_cfg("parallel.deepspeed.extra.zero_optimization.stagee=2"), 2)


def test_conflict_names_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"parallel.deepspeed.extra.train_batch_size=64 conflicts with "
                                          r"train_batch_size=16"):
        deepspeed_config(_cfg("parallel.deepspeed.extra.train_batch_size=64"), 2)
    with pytest.raises(ConfigError, match=r"extra.zero_optimization.stage=3 conflicts with zero_optimization.stage=1"):
        deepspeed_config(_cfg("parallel.deepspeed.zero_stage=1", "parallel.deepspeed.extra.zero_optimization.stage=3"), 2)


def test_fp16_and_bf16_together_is_an_error() -> None:
    with pytest.raises(ConfigError, match="enables fp16 and torch_autocast"):
        deepspeed_config(_cfg("train.precision=fp16", "parallel.deepspeed.extra.fp16.enabled=true"), 1)


def test_micro_batch_mismatch_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"data.batch_size=6 .* must be divisible by train.grad_accum=4"):
        load_config(None, ["parallel.backend=deepspeed", "data.batch_size=6", "train.grad_accum=4"])


def test_cli_refuses_bad_deepspeed_config_before_starting(tmp_path) -> None:
    proc = run_cmd([PYTHON, "-m", "unetdist.train", "--config", str(REPO / "configs/default.yaml"),
                    f"run.dir={tmp_path}", "parallel.backend=deepspeed", "parallel.deepspeed.extra.bogus_key=1"],
                   env={"WORLD_SIZE": "2"})
    assert proc.returncode == 2
    assert "unknown DeepSpeed key 'parallel.deepspeed.extra.bogus_key'" in proc.stderr
    assert not (tmp_path / "config.yaml").exists()
