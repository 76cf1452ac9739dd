"""torchrun, with the two worker exit codes that wrappers and SLURM requeue logic act on kept.

    python -m unetdist.parallel.agent [torchrun options] -m unetdist.train --config ...

Why this module exists: torchrun's elastic agent restarts the worker group after any failure
and, when it gives up, exits 1 whatever its workers said; when the agent itself gets a stop
signal (SIGUSR1 from `scancel -s USR1`, or a user), it forwards it to the workers, waits for
them and then dies with exit 1 and a traceback. So a run stopped cleanly with a checkpoint
looked like a crash, and a configuration error was retried `--max-restarts` times.

This runs torchrun's own command line (`torch.distributed.run.main`, every option unchanged)
with an agent that reads its workers' exit codes:

* 2 (a configuration error, already printed by rank 0): the group is not restarted, exit 2.
* 75 (EX_TEMPFAIL: every rank checkpointed after a stop signal): not restarted, exit 75.
* anything else: torchrun's behaviour (restarts, then exit 1 with its failure table).
"""

from __future__ import annotations

import logging
import signal
import sys

from torch.distributed import run as torchrun
from torch.distributed.elastic.agent.server.api import RunResult, WorkerGroup, WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher import api as launcher_api

log = logging.getLogger("unetdist.agent")

EXIT_CONFIG = 2  # the worker refused its settings: retrying cannot help
EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped cleanly with a checkpoint; run again (requeue) to continue
FINAL = {EXIT_CONFIG: "a configuration error", EXIT_RESUMABLE: "a stop signal (checkpoint written)"}

# What this process's agent saw of its workers, global rank -> exit code (the agent is built inside torchrun).
_codes: dict[int, int] = {}


class ExitCodeAgent(LocalElasticAgent):
    """torchrun's local agent that keeps worker exit codes and never restarts after a final one."""

    def _monitor_workers(self, worker_group: WorkerGroup) -> RunResult:
        result = super()._monitor_workers(worker_group)
        if result.state == WorkerState.FAILED:
            _codes.update({rank: failure.exitcode for rank, failure in result.failures.items()})
            final = sorted({code for code in _codes.values() if code in FINAL})
            if final and self._remaining_restarts > 0:
                log.warning("workers exited with %s (%s): not restarting them",
                            "/".join(map(str, final)), ", ".join(FINAL[c] for c in final))
                self._remaining_restarts = 0
        return result

    def _shutdown(self, death_sig: signal.Signals = signal.SIGTERM, timeout: int = 30) -> None:
        super()._shutdown(death_sig, timeout)
        handlers = getattr(self._pcontext, "subprocess_handlers", None) or {}
        for local_rank, handler in handlers.items():
            code = handler.proc.returncode
            if code is not None:
                _codes[self._worker_group.workers[local_rank].global_rank] = code


def exit_status(codes: dict[int, int]) -> int | None:
    """The status this launcher exits with for these worker codes, or None for torchrun's own (1).

    Every worker ended with 75 (or 0, a rank that had already finished): resumable. Any
    configuration error: 2. Anything else is a real failure and keeps torchrun's report.
    """
    values = set(codes.values())
    if EXIT_CONFIG in values:
        return EXIT_CONFIG
    if EXIT_RESUMABLE in values and values <= {0, EXIT_RESUMABLE}:
        return EXIT_RESUMABLE
    return None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s unetdist agent: %(message)s")
    launcher_api.LocalElasticAgent = ExitCodeAgent  # type: ignore[misc]  # the class torchrun's launch_agent builds
    _codes.clear()
    try:
        torchrun.main(argv)
    except SignalException as exc:
        status = exit_status(_codes)
        if status is None:
            log.error("stopped by %s; workers exited with %s", exc.sigval.name, _codes or "unknown codes")
            return 128 + int(exc.sigval)
        return _report(status)
    except ChildFailedError:
        status = exit_status(_codes)
        if status is None:
            raise
        return _report(status)
    return 0


def _report(status: int) -> int:
    log.warning("workers exited with %s: %s; exit %d", sorted(set(_codes.values())), FINAL[status], status)
    return status


if __name__ == "__main__":
    sys.exit(main())
