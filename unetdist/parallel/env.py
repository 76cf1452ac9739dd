"""The only module that reads the launcher's environment (torchrun, SLURM) and owns the process group.

Everything else receives a `DistEnv` and never looks at os.environ, so model, data and
training code run the same on 1 process or 1,000.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from unetdist.parallel.node import NodeResources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job and which device it drives."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from exc


def node_resources() -> "NodeResources":
    """Cores this process may run on (CPU affinity: what SLURM's --cpus-per-task grants) and the node's
    memory (the smaller of physical memory and a cgroup limit)."""
    from unetdist.parallel.node import NodeResources

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit.isdigit():
            memory = min(memory, int(limit))
    except OSError:
        pass
    return NodeResources(cores=cores, memory_bytes=memory)


def launch_world_size() -> int:
    """The world size the launcher announced, readable before joining the group (for early checks)."""
    return _int_env("WORLD_SIZE", 1)


def launch_rank() -> int:
    """This process's global rank as the launcher announced it, before joining the group (logs, error lines)."""
    return _int_env("RANK", 0)


def init_distributed(timeout_s: int = 1800, group_for_one: bool = False) -> DistEnv:
    """Join the process group described by torchrun's variables, or run alone without them.

    The backend follows the device: NCCL when this process has a GPU, gloo otherwise. The local
    rank (not the global rank) picks the GPU, which is what makes multi-node launches correct.
    One process started without a launcher needs no group, except for DeepSpeed (`group_for_one`),
    whose engine always talks through one: it gets a group of one on an in-process store (no address
    or port needed). Under torchrun a single process joins its group as a larger job would (NCCL
    initialised with `device_id`), so a 1-GPU run exercises the same path.
    """
    rank = _int_env("RANK", 0)
    world_size = _int_env("WORLD_SIZE", 1)
    local_rank = _int_env("LOCAL_RANK", 0)
    local_world_size = _int_env("LOCAL_WORLD_SIZE", 1)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    launched = bool(os.environ.get("MASTER_ADDR")) and "WORLD_SIZE" in os.environ  # torchrun: join even alone
    if (world_size > 1 or group_for_one or launched) and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        device_id = device if backend == "nccl" else None
        if world_size == 1 and not all(os.environ.get(key) for key in ("MASTER_ADDR", "MASTER_PORT")):
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it from the environment
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout, device_id=device_id)
        else:
            for key in ("MASTER_ADDR", "MASTER_PORT"):
                if key not in os.environ:
                    raise RuntimeError(
                        f"WORLD_SIZE={world_size} but {key} is not set: start multi-process runs with torchrun "
                        "(e.g. torchrun --nproc_per_node=2 -m unetdist.train --config ...)"
                    )
            dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id)
    env = DistEnv(rank, world_size, local_rank, local_world_size, device)
    if env.is_main:
        log.info("process group: world_size=%d backend=%s device=%s%s", world_size, backend, device,
                 "" if dist.is_initialized() else " (none: one process)")
    return env


def destroy_distributed() -> None:
    """Leave the process group, after collecting the objects that still hold its backends.

    Engines that are no longer referenced (DeepSpeed's keeps groups of its own) but not yet collected
    would otherwise be freed during interpreter shutdown, after the group, while gloo's threads still
    run: the process then aborts ("terminate called without an active exception") after its work is
    done, and a launcher counts the run as failed.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def cpu_threads_per_rank(local_world_size: int) -> int | None:
    """Intra-op CPU threads for each of ``local_world_size`` ranks on this node: cores / local ranks.

    None when the user chose (``OMP_NUM_THREADS`` set; torchrun sets it to 1 for several local
    ranks) or when the process runs alone (torch already uses every core). Ranks that each start
    one thread per core oversubscribe the node, and their threads' barriers then wait on each other.
    """
    if os.environ.get("OMP_NUM_THREADS") or local_world_size <= 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_world_size)
