"""Graceful stop on a signal: finish the step, checkpoint, exit with a code that says "resumable".

SLURM sends SIGUSR1 before a time limit (`--signal=B:USR1@300`) or on `scancel -s USR1`. A signal may
reach only some ranks, so the flag is agreed by an all-reduce each step: every rank stops after the
same step. SIGTERM is deliberately not caught: torchrun uses it to tear down a group whose other
members died, and a collective checkpoint then would hang.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

from unetdist.dist.env import DistEnv

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped cleanly with a checkpoint; run again (requeue) to continue


class Preempted(Exception):
    """Raised by the run loop after the stop checkpoint is written."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped by signal after step {step}; checkpoint written, resumable")
        self.step = step


class StopSignal:
    """Remembers that a stop signal arrived; `agreed` asks all ranks."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGUSR1,)) -> None:
        self.received = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = True

    def agreed(self, env: DistEnv) -> bool:
        """True on every rank once any rank has received the signal."""
        if not env.distributed:
            return self.received
        flag = torch.tensor([1.0 if self.received else 0.0], device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
