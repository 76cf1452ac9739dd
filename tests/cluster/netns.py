"""Separate "hosts" on one machine: network namespaces on a private bridge, each with its own hostname.

This machine (the controller) sits on the bridge. A process started through `HostNetwork.command(host,
argv)` runs in that host's network namespace, in a fresh UTS namespace named like the host, and with a
private /etc/hosts that resolves every host of the network to its bridge address, so multi-node code
runs unchanged (`--rdzv_endpoint=node0:29500`). Cgroups and /sys stay the machine's (slurmd needs them).
Only addresses of a test-made 10.213.x.0/24 bridge are used; nothing is routed outside the machine.
`close()` kills what runs in the namespaces, deletes them and the bridge, and is safe to call twice.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

_COUNTER = itertools.count()
_ENTER = 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'


def unavailable_reason() -> str | None:
    """Why this machine cannot make network namespaces (None: it can)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "network namespaces need root (run the tests as root, as CI does)"
    for tool in ("ip", "nsenter", "unshare", "hostname", "mount"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2 util-linux)"
    probe = f"udprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    addr: str


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _free_subnet() -> str:
    used = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    used += subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
    start = os.getpid() % 250
    for k in range(250):
        prefix = f"10.213.{(start + k) % 250 + 1}"
        if f"{prefix}." not in used:
            return prefix
    raise RuntimeError("no free 10.213.x.0/24 subnet for the test network")


class HostNetwork:
    """A bridge at `<prefix>.1` (the "controller", on this machine) and one namespace per host."""

    def __init__(self, workdir: Path, names: Sequence[str]) -> None:
        self.workdir = workdir
        self.tag = f"ud{os.getpid()}{next(_COUNTER)}"
        self.bridge = f"{self.tag}br"
        self.prefix = _free_subnet()
        self.gateway = f"{self.prefix}.1"
        self.hosts = {name: Host(name, f"{self.tag}-{name}", f"{self.prefix}.{10 + i}") for i, name in enumerate(names)}
        self.hosts_file = workdir / "hosts"
        self._made: list[tuple[str, ...]] = []

    def start(self) -> "HostNetwork":
        """Create the bridge, namespaces, veth pairs and the shared hosts file."""
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", f"{self.gateway} {socket.gethostname().split('.')[0]}"]
        lines += [f"{h.addr} {h.name}" for h in self.hosts.values()]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", "del", self.bridge))
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, host in enumerate(self.hosts.values()):
            outer, inner = f"{self.tag}h{i}", f"{self.tag}p{i}"
            _ip("netns", "add", host.netns)
            self._made.append(("netns", "del", host.netns))
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            self._made.append(("link", "del", outer))
            _ip("link", "set", outer, "master", self.bridge)
            _ip("link", "set", outer, "up")
            _ip("link", "set", inner, "netns", host.netns)
            ns = ("-n", host.netns)
            _ip(*ns, "link", "set", inner, "name", "eth0")
            _ip(*ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            _ip(*ns, "link", "set", "eth0", "up")
            _ip(*ns, "link", "set", "lo", "up")

    def command(self, host: str, argv: Sequence[str]) -> list[str]:
        """`argv` as run on `host`: its network, its hostname, its /etc/hosts (cgroups and /sys untouched)."""
        h = self.hosts[host]
        return ["nsenter", f"--net=/run/netns/{h.netns}", "unshare", "--uts", "--mount", "--propagation", "private",
                "sh", "-c", _ENTER, "sh", h.name, str(self.hosts_file), *argv]

    def pids(self, host: str) -> list[int]:
        proc = subprocess.run(["ip", "netns", "pids", self.hosts[host].netns], capture_output=True, text=True)
        return [int(p) for p in proc.stdout.split()]

    def kill_all(self) -> None:
        """SIGKILL every process left in this network's namespaces (all of them were started by the test)."""
        for _ in range(20):
            pids = [p for host in self.hosts for p in self.pids(host)]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def close(self) -> None:
        """Kill what runs inside, then delete namespaces, veths and the bridge (newest first)."""
        if not self._made:
            return
        self.kill_all()
        while self._made:
            subprocess.run(["ip", *self._made.pop()], capture_output=True)

    def __enter__(self) -> "HostNetwork":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
