"""Test-only probes, loaded into every Python a test starts with this folder on PYTHONPATH.

They keep production code free of test hooks. Both act only when their variable is set:

- `UNETDIST_TEST_RECORD=DIR`: a torchrun worker (it has `RANK`) writes `DIR/<pid>.json` saying where
  it runs: rank, restart count, hostname, network namespace, and the NCCL_* variables it received.
- `UNETDIST_TEST_KILL_AT_COMMIT=STEP` (with `UNETDIST_TEST_RECORD`): the process that commits the
  checkpoint of STEP SIGKILLs itself after the file is written under its temporary name and before
  `os.replace` (or `os.rename`) gives it its final name, once (a marker in DIR stops a second kill). It first writes
  `DIR/at-kill.json` with the checkpoint folder's listing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

_record = os.environ.get("UNETDIST_TEST_RECORD")


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


if _record and "RANK" in os.environ:
    _dir = Path(_record)
    _dir.mkdir(parents=True, exist_ok=True)
    _write(_dir / f"{os.getpid()}.json", {
        "pid": os.getpid(),
        "rank": int(os.environ["RANK"]),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "hostname": socket.gethostname(),
        "netns": os.readlink("/proc/self/ns/net"),
        "master_addr": os.environ.get("MASTER_ADDR"),
        "nccl": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
        "time": time.time(),
    })

_kill_step = os.environ.get("UNETDIST_TEST_KILL_AT_COMMIT")
if _record and _kill_step:
    _target = f"step_{int(_kill_step):09d}.pt"
    _marker = Path(_record) / "killed-at-commit"

    def _dying(real):  # type: ignore[no-untyped-def]
        def rename_then_die(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
            if Path(dst).name == _target and not _marker.exists():
                folder = Path(dst).parent
                _marker.write_text(str(os.getpid()))
                _write(Path(_record) / "at-kill.json", {
                    "listing": {p.name: p.stat().st_size for p in folder.iterdir()},
                    "pid": os.getpid(),
                })
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst, *args, **kwargs)
        return rename_then_die

    os.replace = _dying(os.replace)
    os.rename = _dying(os.rename)
