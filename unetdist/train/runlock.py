"""One run per run folder: a second run started on the same `run.dir` fails at once, naming the holder.

Two runs writing one folder overwrite each other's checkpoints and TensorBoard steps. The lock
is a POSIX record lock (`lockf`) on `run.dir/.lock`, held by rank 0 for the whole run; the kernel
drops it when the process ends in any way (kill -9 included), so a crashed or restarted run never
finds a stale lock. Unlike `flock`, it is not inherited by forked children (data-loader workers
outliving a killed rank 0 by a few seconds would otherwise block its restart), and it works
across hosts on NFS. The file records host, pid and start time for the message.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import logging
import os
import socket
from pathlib import Path

from unetdist.config import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunLock:
    """Holds the lock of `run_dir` from `acquire` until `release` (or the end of the process)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):  # a file system without locks: say so, go on
                log.warning("cannot lock %s (%s): nothing stops a second run on this run.dir", self.path, exc)
                os.close(fd)
                return
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise ConfigError(f"run.dir {self.path.parent} is in use by another run ({holder}); wait for it to end "
                              "or stop it, or set run.dir to another folder") from None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
