"""Our config -> DeepSpeed's JSON config, validated before any process group exists.

Pure: no process group, no DeepSpeed engine. Batch arithmetic comes from our keys, so a
DeepSpeed config can never disagree with the data loader; raw keys a user adds under
`parallel.deepspeed.extra` are merged in, and any that contradict ours are an error naming both.
"""

from __future__ import annotations

import re
from typing import Any

from unetdist.config import Config, ConfigError

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


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for this run on `world_size` ranks, or a ConfigError saying what to fix."""
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
    if train.precision == "bf16":
        # Autocast keeps fp32 weights and BatchNorm statistics; DeepSpeed's "bf16" section casts the
        # weights and fails with BatchNorm ("expected scalar type BFloat16 but found Float").
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif train.precision == "fp16":
        out["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
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
    fp16 = bool(out.get("fp16", {}).get("enabled", False))
    bf16 = bool(out.get("bf16", {}).get("enabled", False)) or bool(out.get("torch_autocast", {}).get("enabled", False))
    if fp16 and bf16:
        raise ConfigError("fp16 and bf16 are both enabled in the DeepSpeed config; choose one with train.precision")
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
