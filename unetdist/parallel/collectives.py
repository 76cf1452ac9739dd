"""The collectives the rest of the package needs, behind one small API.

Why this module exists: model, data, training and prediction code must run unchanged on 1
process or 1,000. They call these functions with a `DistEnv`; with one process every function
is a no-op (or returns its input), so no caller tests `torch.distributed.is_initialized()`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from unetdist.parallel.env import DistEnv


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()



def broadcast_object(env: DistEnv, obj: object) -> object:
    """Rank 0's `obj` on every rank, so decisions made from the file system agree everywhere."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(env: DistEnv, value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a copy; the input is left as it was)."""
    out = value.detach().clone()
    if env.distributed:
        dist.all_reduce(out)
        out /= env.world_size
    return out


def all_reduce_max(env: DistEnv, value: float) -> float:
    """The largest of each rank's `value` (e.g. peak memory: the rank closest to running out)."""
    if not env.distributed:
        return value
    out = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return float(out.item())


def all_reduce_sum_(env: DistEnv, *tensors: torch.Tensor) -> None:
    """Sum each tensor over ranks, in place (one collective per tensor)."""
    if env.distributed:
        for tensor in tensors:
            dist.all_reduce(tensor)


def any_rank(env: DistEnv, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one."""
    if not env.distributed:
        return flag
    out = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return bool(out.item() > 0)


def broadcast_(env: DistEnv, tensors: Any, src: int = 0) -> None:
    """Overwrite each tensor in `tensors` with rank `src`'s values, in place."""
    if env.distributed:
        for tensor in tensors:
            dist.broadcast(tensor, src)


def all_gather_object(env: DistEnv, obj: object) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def send(tensor: torch.Tensor, dst: int) -> None:
    """Point-to-point send (the receiver must call `recv` with a tensor of the same shape)."""
    dist.send(tensor, dst)


def recv(tensor: torch.Tensor, src: int) -> None:
    """Point-to-point receive into `tensor`."""
    dist.recv(tensor, src)


def group_backend() -> str | None:
    """The default process group's backend (``nccl``, ``gloo``), or None without a group."""
    return str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else None
