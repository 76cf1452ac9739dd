"""`launch/gpu_check.sh --dry-run`: the GPU check's steps on CPU at the tiny preset, read back from its files.

It runs `unetdist bench smoke` and `unetdist bench --preset tiny` through the real CLI, so this
is also the CI smoke test of the benchmark: the JSON has its schema and every figure is positive
(no timing is asserted: these CPUs are shared).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tests.conftest import PYTHON, run_cmd
from unetdist.bench.report import SCHEMA, check_report
from unetdist.cli import build_parser

pytestmark = pytest.mark.slow


def test_cli_registers_bench_commands() -> None:
    parser = build_parser()
    assert parser.parse_args(["bench", "--preset", "tiny"]).func.__name__ == "_bench"
    assert parser.parse_args(["bench", "train", "--only", "memory"]).func.__name__ == "_bench"
    assert parser.parse_args(["bench", "smoke", "--steps", "5"]).func.__name__ == "_smoke"
    bench = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["bench"]
    sub = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"train", "smoke", "loader", "predict", "shard"}


def test_bench_tiny_compares_our_default_with_the_reference(tmp_path: Path) -> None:
    """`unetdist bench --preset tiny` (what the GPU check's table section runs on a GPU preset): every section,
    a valid report, our default configuration against the reference. The GPU check itself: test_gpu_check.py."""
    out = tmp_path / "bench"
    proc = run_cmd([PYTHON, "-m", "unetdist.cli", "bench", "--preset", "tiny", "--out", str(out),
                    "--data-dir", str(tmp_path / "data")], timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["schema"] == SCHEMA and report["preset"] == "tiny"
    assert check_report(report) == [] and report["problems"] == []
    names = [row["name"] for row in report["rows"]]
    default = "ours fp32+channels_last"  # our default configuration on CPU
    for name in ("reference [end_to_end]", f"{default} [end_to_end]", "reference [compute]", f"{default} [compute]",
                 default, "ours fp32", "ours bf16+channels_last", f"{default} ckpt=highres", f"{default} ckpt=all",
                 "ours bf16+channels_last ckpt=all", f"{default} DDP x1", f"{default} DDP x2"):
        assert name in names, f"missing row {name!r}; have {names}"
    assert [(c["numerator"], c["denominator"]) for c in report["comparisons"]] == [
        (f"{default} [end_to_end]", "reference [end_to_end]"), (f"{default} [compute]", "reference [compute]")]
    assert report["ddp"]["processes"] == [1, 2] and report["ddp"]["backend"] == "gloo"
    assert set(report["memory"]["policies"]) == {"none", "highres", "all"} and report["memory"]["tile"] == 512
    assert any(s["row"] == "ours compile" for s in report["skipped"])  # GPU only, said so
