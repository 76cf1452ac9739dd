"""Run a function in N real gloo processes on loopback (the accelerate `debug_launcher` pattern).

The children get torchrun's variables, so the code under test joins the group exactly as it
would under torchrun, through `unetdist.parallel.env.init_distributed`.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch.multiprocessing as mp

from tests.conftest import free_port


def _child(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    fn(*args)


def spawn(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Run `fn(*args)` in `world_size` processes; raises if any of them fails."""
    mp.start_processes(_child, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True, start_method="spawn")
