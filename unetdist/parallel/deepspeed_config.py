"""Our config -> DeepSpeed's JSON config, validated before any process group exists.

Pure: no process group, no DeepSpeed engine. Batch arithmetic comes from our keys, so a
DeepSpeed config can never disagree with the data loader; raw keys a user adds under
`parallel.deepspeed.extra` are merged in, and any that contradict ours are an error naming both.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from packaging.version import Version

from unetdist.config import Config, ConfigError
from unetdist.parallel.precision import choose_amp_dtype

# `torch_autocast` (how we run bf16 and fp16 with fp32 weights and BatchNorm) arrived in DeepSpeed 0.17.2;
# older versions ignore the section without a word and train in fp32.
MIN_DEEPSPEED_AUTOCAST = "0.17.2"

# Top-level sections DeepSpeed reads that are not in deepspeed.runtime.constants.
_SECTIONS = {
    "zero_optimization", "activation_checkpointing", "flops_profiler", "tensorboard", "wandb", "csv_monitor",
    "comms_logger", "compile", "aio", "data_efficiency", "curriculum_learning", "elasticity", "autotuning",
    "compression_training", "sparse_attention", "weight_quantization", "hybrid_engine", "nebula", "pipeline",
    "quantize_training", "sparse_gradients", "monitor_config",
}


def known_top_level_keys() -> set[str]:
    import deepspeed.runtime.constants as constants

    names = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str) and re.fullmatch(r"[a-z0-9_]+", v)}
    return names | _SECTIONS


def deepspeed_config(cfg: Config, world_size: int, device_type: str = "cpu",
                     capability: tuple[int, int] | None = None) -> dict[str, Any]:
    """The DeepSpeed config for this run on `world_size` ranks, or a ConfigError saying what to fix.

    The precision section follows the same choice as the DDP engine (`train.precision=auto` means
    bf16 on GPUs with bf16 hardware, fp16 on older GPUs, fp32 on CPU), from the device's kind and
    compute capability.
    """
    ds, train = cfg.parallel.deepspeed, cfg.train
    micro = cfg.data.batch_size // train.grad_accum
    out: dict[str, Any] = {
        "train_batch_size": cfg.data.batch_size * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {
            "stage": ds.zero_stage,
            "reduce_bucket_size": ds.reduce_bucket_size,
            "allgather_bucket_size": ds.allgather_bucket_size,
            "overlap_comm": ds.overlap_comm,
        },
        "steps_per_print": 2**31 - 1,  # our logger reports progress
        "wall_clock_breakdown": False,
    }
    if ds.zero_stage == 3:
        del out["zero_optimization"]["allgather_bucket_size"]  # stage 3 gathers per layer (prefetch buckets)
        out["zero_optimization"]["stage3_prefetch_bucket_size"] = ds.allgather_bucket_size
    amp_dtype = choose_amp_dtype(train.precision, device_type, capability)
    if amp_dtype is not None:
        # Autocast keeps fp32 weights and BatchNorm statistics. DeepSpeed's "bf16"/"fp16" sections cast the
        # weights instead and fail with BatchNorm ("expected scalar type BFloat16 but found Float") or meet
        # float32 images with half weights in the first convolution. With float16 DeepSpeed adds a dynamic
        # loss scaler (torch.amp.GradScaler) itself.
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if amp_dtype == torch.bfloat16 else "float16"}
    if ds.optimizer == "torch":
        # Ours are element-wise (AdamW, SGD), so ZeRO's flat partitions update exactly as whole tensors would.
        out["zero_allow_untested_optimizer"] = True
    if ds.optimizer == "deepspeed":
        kind = "AdamW" if train.optimizer == "adamw" else "SGD"
        params: dict[str, Any] = {"lr": train.lr, "weight_decay": train.weight_decay}
        if kind == "SGD":
            params["momentum"] = train.momentum
        out["optimizer"] = {"type": kind, "params": params}
    if ds.scheduler == "deepspeed":
        out["scheduler"] = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": train.steps, "warmup_num_steps": train.warmup_steps, "warmup_type": "linear",
            "warmup_min_ratio": 0.0, "cos_min_ratio": train.min_lr_ratio}}
    _merge(out, ds.extra, "parallel.deepspeed.extra")
    _check(out, world_size)
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any], where: str) -> None:
    known = known_top_level_keys() if where == "parallel.deepspeed.extra" else None
    for key, value in extra.items():
        path = f"{where}.{key}"
        if known is not None and key not in known:
            raise ConfigError(f"unknown DeepSpeed key {path!r}: DeepSpeed has no top-level key {key!r} "
                              "(see https://www.deepspeed.ai/docs/config-json/)")
        if key not in base:
            base[key] = value
        elif isinstance(base[key], dict) and isinstance(value, dict):
            _merge(base[key], value, path)
        elif base[key] != value:
            ours = path.removeprefix("parallel.deepspeed.extra.")
            raise ConfigError(f"{path}={value!r} conflicts with {ours}={base[key]!r}, which unetdist derives from its "
                              "own keys (data.batch_size, train.grad_accum, train.grad_clip, train.precision, "
                              "parallel.deepspeed.*); set those instead")


def _check(out: dict[str, Any], world_size: int) -> None:
    enabled = [name for name in ("fp16", "bf16", "torch_autocast") if out.get(name, {}).get("enabled", False)]
    if len(enabled) > 1:
        raise ConfigError(f"the DeepSpeed config enables {' and '.join(enabled)}: choose one precision with "
                          "train.precision (unetdist runs bf16 and fp16 through torch_autocast)")
    expected = out["train_micro_batch_size_per_gpu"] * out["gradient_accumulation_steps"] * world_size
    if out["train_batch_size"] != expected:
        raise ConfigError(
            f"DeepSpeed batch mismatch: train_batch_size={out['train_batch_size']} but micro-batch "
            f"{out['train_micro_batch_size_per_gpu']} x accumulation {out['gradient_accumulation_steps']} x "
            f"world size {world_size} = {expected}")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**out["zero_optimization"])
    except Exception as exc:  # pydantic's ValidationError names the offending key
        raise ConfigError("invalid DeepSpeed zero_optimization section (from parallel.deepspeed.* and "
                          f"parallel.deepspeed.extra.zero_optimization): {exc}") from exc


def check_deepspeed_version(version: str, ds_config: dict[str, Any]) -> None:
    """Refuse a DeepSpeed too old for the `torch_autocast` section this config needs (it would train in fp32)."""
    if ds_config.get("torch_autocast", {}).get("enabled") and Version(version) < Version(MIN_DEEPSPEED_AUTOCAST):
        dtype = ds_config["torch_autocast"]["dtype"]
        raise ConfigError(f"DeepSpeed {version} ignores the torch_autocast section and would train this {dtype} run "
                          f"in fp32; install deepspeed>={MIN_DEEPSPEED_AUTOCAST} or set train.precision=fp32")
