"""A private SLURM cluster for tests: munged, slurmctld on this machine, one slurmd per namespace "host".

Everything (munge key, socket and seed; slurm.conf, state, spool, logs) lives under one 0755 folder,
on private ports, so it touches nothing of the machine's own SLURM or munge. Each node advertises one
stand-in GPU (GRES `gpu` backed by /dev/null; SLURM 22.05 refuses GPU GRES without a device file), so
`--gpus-per-node=1` works as on a GPU cluster and jobs see `SLURM_GPUS_ON_NODE=1`. `close()` stops the
jobs and daemons, even half-started ones.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Sequence

from tests.cluster.netns import HostNetwork

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo")


def unavailable_reason() -> str | None:
    """Why no private SLURM can run here (None: it can)."""
    missing = [tool for tool in DAEMONS if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]
    if missing:
        return (f"SLURM/munge not installed ({', '.join(missing)} missing): "
                "apt-get install slurm-wlm munge (.ci/run does)")
    return None


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class SlurmError(RuntimeError):
    pass


class PrivateSlurm:
    """Controller on the bridge address of `network`, a node per host of `network`."""

    def __init__(self, root: Path, network: HostNetwork, cpus: int = 2) -> None:
        self.root = root
        self.network = network
        self.cpus = cpus
        self.conf = root / "etc" / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self._procs: list[tuple[str, subprocess.Popen]] = []

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> "PrivateSlurm":
        try:
            self._start_munge()
            self._write_config()
            self._spawn("slurmctld", [_tool("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            for name in self.network.hosts:
                argv = [_tool("slurmd"), "-D", "-N", name, "-f", str(self.conf)]
                self._spawn(f"slurmd-{name}", self.network.command(name, argv))
            self._wait_idle(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Cancel jobs, stop slurmctld and every slurmd, kill leftovers in the namespaces, stop munged."""
        if not self._procs:
            return
        if any(name == "slurmctld" and proc.poll() is None for name, proc in self._procs):
            self.client(["scancel", "--full", "--quiet", "--user=root"], timeout=15, check=False)
            self.client(["scontrol", "shutdown"], timeout=15, check=False)
        deadline = time.monotonic() + 15
        for name, proc in reversed(self._procs):
            if name == "munged":  # last: slurmctld and slurmd talk to it while they stop
                self.network.kill_all()  # job steps left by slurmstepd, if any
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self._procs.clear()

    def __enter__(self) -> "PrivateSlurm":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self._procs.append((name, proc))

    def _start_munge(self) -> None:
        for sub, mode in (("etc", 0o755), ("log", 0o755), ("state", 0o755), ("munge", 0o755), ("munge-key", 0o700)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            (self.root / sub).chmod(mode)
        self.root.chmod(0o755)
        closed = [p for p in (self.root, *self.root.parents) if not p.stat().st_mode & 0o001]
        if closed:
            raise SlurmError(f"munged needs o+x on every folder above its socket; {closed[0]} lacks it "
                             "(pytest's tmp_path is 0700: use a 0755 folder such as one from tempfile.mkdtemp + chmod)")
        for name in self.network.hosts:
            (self.root / "spool" / name).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge-key" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        self._spawn("munged", [_tool("munged"), "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if self._procs[-1][1].poll() is not None or time.monotonic() > deadline:
                raise SlurmError(f"munged did not start: {self.logs('munged')}")
            time.sleep(0.05)

    def _write_config(self) -> None:
        r, net = self.root, self.network
        nodes = list(net.hosts.values())
        lines = [
            "ClusterName=unetdist-test",
            f"SlurmctldHost={socket.gethostname().split('.')[0]}({net.gateway})", "MailProg=/bin/true",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'state' / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'spool'}/%n/slurmd.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log'}/slurmd-%n.log",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=1",
            "SlurmdParameters=config_overrides", "MpiDefault=none", "ReturnToService=2",
            "JobRequeue=1", "KillWait=5", "MinJobAge=600", "InactiveLimit=0", "Waittime=0",
            "GresTypes=gpu",
        ]
        for node in nodes:
            lines.append(f"NodeName={node.name} NodeAddr={node.addr} NodeHostname={node.name} "
                         f"CPUs={self.cpus} RealMemory=8000 Gres=gpu:1 State=UNKNOWN")
        names = ",".join(n.name for n in nodes)
        lines.append(f"PartitionName=test Nodes={names} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        (self.conf.parent / "gres.conf").write_text("AutoDetect=off\nName=gpu File=/dev/null\n")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            for name, proc in self._procs:
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited with {proc.returncode}: {self.logs(name)}")
            out = self.client(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=10, check=False)
            states = out.stdout.strip()
            lines = states.splitlines()
            if len(lines) == len(self.network.hosts) and all(line.split()[1] == "idle" for line in lines):
                return
            time.sleep(0.2)
        raise SlurmError(f"nodes not idle after {timeout:.0f} s: {states!r}\n{self.logs()}")

    # -- clients -------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def client(self, argv: Sequence[str], timeout: float = 30, check: bool = True,
               cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sbatch, scontrol, ...) on this machine against the private controller."""
        full_env = {**os.environ, **(env or {}), **self.env}
        proc = subprocess.run([_tool(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=timeout,
                              env=full_env, cwd=cwd)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} -> {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, argv: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> int:
        out = self.client(["sbatch", "--parsable", *argv], cwd=cwd, env=env).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, NodeList, ExitCode, ...)."""
        out = self.client(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: int, states: Sequence[str], timeout: float) -> dict[str, str]:
        """Poll until the job is in one of `states`; raise with the logs on timeout."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.25)
        raise SlurmError(f"job {job_id} not in {states} after {timeout:.0f} s: {info}\n{self.logs()}")

    def logs(self, *names: str) -> str:
        """The tail of the daemons' logs, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            if names and not any(n in path.name for n in names):
                continue
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name}\n{text[-2000:]}")
        return "\n".join(parts)
