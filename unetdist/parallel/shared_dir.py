"""Check that every node sees the same run folder before a multi-node run writes anything into it.

Why this module exists: rank 0 decides which checkpoint to resume and broadcasts its path, and
DeepSpeed's per-rank checkpoint shards are committed by a rename on rank 0's file system. Both
assume `run.dir` is one shared folder (NFS, Lustre, GPFS) mounted at the same path on every
node. On node-local disks each node would resume, write and prune its own different files. So
rank 0 writes a marker with a fresh token, every node's local rank 0 reads it back, and a node
that cannot see it stops the run with a message naming the node and the folder.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

from unetdist.config import ConfigError
from unetdist.parallel.collectives import all_gather_object, barrier, broadcast_object
from unetdist.parallel.env import DistEnv

MARKER = ".unetdist-shared-check"


def _sees(marker: Path, token: str, wait_s: float) -> bool:
    """True once `marker` holds `token` (retried briefly: network file systems cache directory entries)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if marker.read_text() == token:
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def check_shared_run_dir(env: DistEnv, run_dir: Path, wait_s: float = 10.0) -> None:
    """Collective: raise ConfigError on every rank unless every node sees rank 0's `run_dir`.

    Only local rank 0 of each node reads the marker. Runs on one node need no check (every rank
    sees the same disk), so callers may skip it when `world_size == local_world_size`.
    """
    marker = run_dir / MARKER
    token = None
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        token = f"{uuid.uuid4().hex} {socket.gethostname()}"
        tmp = marker.with_name(f"{MARKER}.{os.getpid()}.tmp")
        tmp.write_text(token)
        tmp.replace(marker)
    token = broadcast_object(env, token)
    seen = True if env.local_rank != 0 else _sees(marker, str(token), 0.0 if env.is_main else wait_s)
    views = all_gather_object(env, (env.rank, socket.gethostname(), seen))  # every read is done after this
    if env.is_main:
        marker.unlink(missing_ok=True)
    barrier(env)
    blind = [f"{host} (rank {rank})" for rank, host, ok in views if not ok]
    if blind:
        writer = str(token).split(" ", 1)[1]
        raise ConfigError(
            f"run.dir={run_dir} is not the same folder on every node: {', '.join(blind)} cannot see the file rank 0 "
            f"wrote into it on {writer}. Multi-node runs resume and commit checkpoints through rank 0, so run.dir "
            "must be on a file system every node mounts at the same path (NFS, Lustre, GPFS); set run.dir to such a "
            "folder")
