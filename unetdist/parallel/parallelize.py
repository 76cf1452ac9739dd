"""Turn a plain UNet into the module that trains: one place, a fixed order.

`prepare_module` does what every backend needs (norm conversion, activation checkpointing,
device, memory format, compile); `wrap_ddp` adds DDP last so it registers the final parameters
and buffers. The DeepSpeed adapter calls `prepare_module` and hands the result to its engine.

The order matters: checkpointing replaces stage forwards on the instances, so compile (which
traces through them) comes after it; memory format and device come before compile, so the
compiled graph is specialised for the layout it will see; DDP wraps the compiled module, so its
gradient hooks stay on the parameters, outside the graph. ``nn.Module.compile`` compiles in
place: module names and state-dict keys do not change, so checkpoints load under any setting.
"""

# No `from __future__ import annotations`: DDP checks the comm hook's annotations as real types.
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from unetdist.config import ParallelConfig, TrainConfig
from unetdist.parallel.checkpointing import apply_activation_checkpointing
from unetdist.parallel.env import DistEnv


def compile_mode(setting: bool | str) -> str | None:
    """The ``torch.compile`` mode for ``train.compile`` (None: eager)."""
    if setting is False:
        return None
    return "default" if setting is True else str(setting)


def prepare_module(model: nn.Module, train: TrainConfig, parallel: ParallelConfig, env: DistEnv,
                   contiguous_weights: bool = False) -> nn.Module:
    """SyncBatchNorm (GPU, several ranks) -> activation checkpointing -> device -> memory format -> compile.

    ``contiguous_weights`` keeps the parameters in the default layout even with ``train.channels_last``
    (DeepSpeed flattens and broadcasts parameters as contiguous buffers and refuses NHWC-strided ones);
    the trainer still feeds channels_last images, so the convolutions run in NHWC all the same.
    """
    if parallel.sync_batchnorm and env.distributed and env.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    apply_activation_checkpointing(model, train.activation_checkpointing)
    model.to(env.device)
    if train.channels_last and not contiguous_weights:
        model.to(memory_format=torch.channels_last)
    mode = compile_mode(train.compile)
    if mode is not None:
        model.compile(mode=mode)
    return model


def wrap_ddp(model: nn.Module, parallel: ParallelConfig, env: DistEnv) -> nn.Module:
    """DDP across ranks (the plain module when running alone), with the configured all-reduce options.

    ``gradient_as_bucket_view`` saves one copy of every gradient per step and changes no number;
    ``grad_compression: bf16`` halves the bytes each all-reduce moves at the price of rounding
    the averaged gradient to bf16 (8 mantissa bits), for slow interconnects.
    """
    if not env.distributed:
        return model
    ddp = DistributedDataParallel(
        model,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        bucket_cap_mb=parallel.bucket_mb,
        static_graph=parallel.static_graph,
        gradient_as_bucket_view=parallel.gradient_as_bucket_view,
    )
    if parallel.grad_compression == "bf16":
        ddp.register_comm_hook(None, bf16_allreduce_hook)
    return ddp


def bf16_allreduce_hook(group: dist.ProcessGroup | None,
                        bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """All-reduce one gradient bucket in bf16 and write the mean back in the gradients' dtype.

    torch's own ``bf16_compress_hook`` refuses anything but NCCL/XCCL (DDP checks the hook's name,
    hence another one); this is the same arithmetic (divide first, so the sum cannot overflow) on
    any backend, gloo included.
    """
    group = group if group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(dist.get_world_size(group))
    future = dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(done: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        buffer.copy_(done.value()[0])
        return buffer

    return future.then(decompress)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper, whose state_dict keys carry no `module.` prefix."""
    return model.module if isinstance(model, DistributedDataParallel) else model
