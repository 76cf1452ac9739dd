"""launch/gpu_check.sh on CPU: the dry run passes every section, and sections are isolated from each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.procs import descendants
from tests.conftest import REPO
from unetdist.bench.gpu_check import SECTIONS

pytestmark = pytest.mark.slow


def test_dry_run_passes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "check"
    env = {**os.environ, "GPU_CHECK_DEADLINE": "1500", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(REPO / "launch/gpu_check.sh"), "--dry-run", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    report = json.loads((out / "gpu_check.json").read_text())
    statuses = {s["name"]: s["status"] for s in report["sections"]}
    assert proc.returncode == 0 and report["passed"], (statuses, proc.stdout[-4000:])
    assert list(statuses) == list(SECTIONS)
    figures = {s["name"]: s["figures"] for s in report["sections"]}
    assert figures["train"]["backend"] == "gloo" and figures["train"]["resume_max_rel_loss_diff"] <= 1e-5
    assert figures["deepspeed"]["fp16"]["loss_scale"] >= 1 and figures["deepspeed"]["bf16"]["autocast"] == "bfloat16"
    assert figures["predict"]["label_agreement"] >= 0.995 and figures["table"]["rows"] > 0
    table = (out / "gpu_check.txt").read_text()
    assert "GPU check (dry): PASSED" in table and all(f"\n{name} " in table for name in SECTIONS)


def test_a_crash_and_a_hang_do_not_stop_the_other_sections(tmp_path: Path) -> None:
    out = tmp_path / "check"
    before = set(descendants(os.getpid()))  # other tests' session fixtures (clusters, servers) may run processes
    proc = subprocess.Popen([sys.executable, "-m", "unetdist.bench.gpu_check", "run", "--mode", "dry", "--out",
                             str(out), "--sections", "compile,syncbn,loader,predict", "--break", "compile",
                             "--hang", "loader", "--limit-s", "60", "--deadline-s", "35"],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output, _ = proc.communicate(timeout=300)
    report = json.loads((out / "gpu_check.json").read_text())
    status = {s["name"]: s for s in report["sections"]}
    assert proc.returncode == 1 and not report["passed"], output[-3000:]
    assert status["compile"]["status"] == "error" and "without a result" in status["compile"]["detail"]
    assert status["syncbn"]["status"] == "pass", status["syncbn"]    # after a crashed section
    # the hanging section gets what is left of the deadline, is killed then, and nothing starts after it
    assert status["loader"]["status"] == "timeout" and status["loader"]["seconds"] <= status["loader"]["limit_s"] + 5
    assert status["predict"]["status"] == "skipped" and "deadline" in status["predict"]["detail"]
    left = set(descendants(os.getpid())) - before
    assert not left, f"a section's processes outlived it: {sorted(left)}"
