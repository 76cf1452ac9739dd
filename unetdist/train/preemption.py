"""Graceful stop on a signal: finish the step, checkpoint, exit with a code that says "resumable".

SLURM sends SIGUSR1 before a time limit (`--signal=B:USR1@300`) or on `scancel -s USR1`. A signal may
reach only some ranks, so the flag is agreed by an all-reduce each step: every rank stops after the
same step. SIGTERM is deliberately not caught: torchrun uses it to tear down a group whose other
members died, and a collective checkpoint then would hang.
"""

from __future__ import annotations

import signal
from types import FrameType

from unetdist.parallel.collectives import any_rank
from unetdist.parallel.env import DistEnv

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
        return any_rank(env, self.received)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
