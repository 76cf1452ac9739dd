"""Real gloo ranks agree on a stop signal that reached only one of them, at the same step, every N steps."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.multiproc.spawn import spawn

pytestmark = pytest.mark.slow


def _worker(out: str, every: int) -> None:
    from unetdist.parallel.env import destroy_distributed, init_distributed
    from unetdist.train.preemption import StopSignal

    env = init_distributed()
    stop = StopSignal(every=every)
    try:
        seen = {}
        for step in range(1, 3 * every + 2):
            if env.rank == 1 and step == every + 1:
                os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is told
            agreed = stop.agreed(env, step)
            if agreed:
                seen["first"] = (step, agreed)
                break
        seen["forced"] = stop.agreed(env, 1, force=True)  # after a checkpoint: checked whatever the step
        Path(f"{out}.{env.rank}").write_text(json.dumps(seen))
    finally:
        stop.restore()
        destroy_distributed()


def test_one_rank_signalled_both_stop_at_the_next_check(tmp_path: Path) -> None:
    out = tmp_path / "seen"
    spawn(_worker, 2, str(out), 4)
    seen = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    assert seen[0] == seen[1], seen
    assert seen[0]["first"] == [8, signal.SIGUSR1] and seen[0]["forced"] == signal.SIGUSR1
