"""Process trees a test started: find every descendant and kill them, so no torchrun worker outlives a test.

torchrun puts each worker in its own session, so killing the launcher's process group is not enough.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Sequence


def descendants(pid: int) -> list[int]:
    """All processes below `pid`, from /proc (children before grandchildren)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and everything below it (a snapshot taken before the first kill)."""
    for target in [pid, *descendants(pid)]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_tree(argv: Sequence[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess:
    """subprocess.run (text output captured) that, on timeout, kills the whole tree and says so in stderr."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)  # type: ignore[call-overload]
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        err += f"\n[test] killed after {timeout:.0f} s"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
