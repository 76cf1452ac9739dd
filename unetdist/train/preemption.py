"""Graceful stop on a signal: finish the step, checkpoint, exit with a code that says why.

SIGUSR1 (SLURM's warning before a time limit, `scancel -s USR1`) exits 75, "resumable"; SIGINT
(Ctrl-C) 130 and SIGTERM (`scancel`, `kill`) 143, the shell's codes for those signals. A second
Ctrl-C more than a second after the first aborts at once (the first second is left out because
a terminal's Ctrl-C reaches the workers both directly and through torchrun's agent).

A signal may reach only some ranks, so the flag is agreed by a collective, every
`train.stop_check_every` steps rather than every step: the collective synchronises the host with
the device, which costs a GPU step its queued-up work. All ranks check after the same steps.

torchrun also uses SIGTERM to tear down a group whose other members died. Then the survivors'
next collective fails (gloo) or never completes (NCCL): a failed collective after a stop signal
ends the process with the signal's code and no checkpoint, and a watchdog ends it after
`GRACE_S` seconds in any case, before torchrun's and SLURM's SIGKILL (30 s by default), so a
broken group never hangs on its way out.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType

from unetdist.parallel.collectives import all_reduce_max
from unetdist.parallel.env import DistEnv

log = logging.getLogger(__name__)

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped cleanly with a checkpoint; run again (requeue) to continue
EXIT_CODES = {signal.SIGUSR1: EXIT_RESUMABLE, signal.SIGINT: 128 + signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}
GRACE_S = 25.0  # after SIGTERM: longest time left to checkpoint and exit


class Preempted(Exception):
    """Raised by the run loop after a stop signal, once the checkpoint is written (or cannot be)."""

    def __init__(self, step: int, signum: int = signal.SIGUSR1, checkpoint: bool = True) -> None:
        name = signal.Signals(signum).name
        what = "checkpoint written, resumable" if checkpoint else "no checkpoint written (the group broke up)"
        super().__init__(f"stopped by {name} after step {step}; {what}")
        self.step, self.signum = step, signum
        self.exit_code = EXIT_CODES.get(signal.Signals(signum), EXIT_RESUMABLE)


class StopSignal:
    """Remembers the first stop signal; `agreed` asks all ranks every `every` steps."""

    def __init__(self, every: int = 1, grace_s: float = GRACE_S,
                 signals: tuple[signal.Signals, ...] = tuple(EXIT_CODES)) -> None:
        self.every, self.grace_s = max(1, every), grace_s
        self.received: int = 0
        self._first_at = 0.0
        self._watching = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT == signum and time.monotonic() - self._first_at > 1.0:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now, no checkpoint
        if signum == signal.SIGTERM and self.grace_s > 0 and not self._watching:
            self._watching = True
            threading.Thread(target=self._watchdog, daemon=True).start()
        if not self.received:
            self.received, self._first_at = signum, time.monotonic()

    def _watchdog(self) -> None:
        time.sleep(self.grace_s)
        log.error("stop signal SIGTERM: not done after %.0f s (is another process of the group gone?); exiting now",
                  self.grace_s)
        logging.shutdown()
        os._exit(EXIT_CODES[signal.SIGTERM])

    def agreed(self, env: DistEnv, step: int, force: bool = False) -> int:
        """The stop signal any rank received (0: none), the same on every rank; asks only every `every` steps.

        With one process there is nothing to agree on, so every step is checked for free;
        `force` checks now (e.g. right after a checkpoint, when the devices are in sync anyway).
        """
        if env.distributed and not force and step % self.every:
            return 0
        return int(all_reduce_max(env, float(self.received)))

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
