"""The GPU check's runner: every section in its own process and time limit, one JSON and one table.

    python -m unetdist.bench.gpu_check run --mode gpu|dry --out DIR [--sections a,b] [--deadline-s 420]

Why this module exists: a GPU session is short and one failing path (a compile error, a CUDA
error that aborts the process, a hang in a collective) must not cost the figures of the others.
Sections run one after another, each as `python -m unetdist.bench.gpu_check section NAME`, killed
with its whole process tree at its limit; a section not started by the deadline is reported as
skipped. `launch/gpu_check.sh` checks the environment and calls `run`.
Statuses: pass, fail (ran, a check did not hold), error (raised or crashed), timeout, skipped.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SCHEMA = "unetdist.gpu_check/1"
# name -> (module:function, limit on the GPU s, limit in dry mode s). Correctness first, then figures.
SECTIONS: dict[str, tuple[str, int, int]] = {
    "train": ("unetdist.bench.gpu_sections:section_train", 80, 400),
    "deepspeed": ("unetdist.bench.gpu_sections:section_deepspeed", 55, 200),
    "syncbn": ("unetdist.bench.gpu_sections:section_syncbn", 25, 90),
    "compile": ("unetdist.bench.gpu_sections:section_compile", 70, 150),
    "predict": ("unetdist.bench.gpu_perf:section_predict", 30, 120),
    "table": ("unetdist.bench.gpu_perf:section_table", 95, 200),
    "loader": ("unetdist.bench.gpu_perf:section_loader", 30, 120),
    "memory": ("unetdist.bench.gpu_perf:section_memory", 35, 150),
}
# Dry-mode limits are generous: CI machines are small and shared, and the dry run checks code, not speed.
MIN_START_S = 10  # a section needs at least this much of the deadline left to start


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL a section and everything it started (torchrun puts its workers in their own sessions).

    The tree is frozen first (SIGSTOP, repeated until no new process appears), so that nothing forks
    a child between the listing and the kill, and no child is re-parented away before it is listed.
    """
    frozen: list[int] = []
    for _ in range(10):
        new = [p for p in [pid, *_descendants(pid)] if p not in frozen]
        if not new:
            break
        for target in new:
            _signal(target, signal.SIGSTOP)
        frozen += new
    for target in frozen:
        _signal(target, signal.SIGKILL)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def run_section(name: str, args: argparse.Namespace, limit: float) -> dict[str, Any]:
    """Run one section in a child process; its status, time and figures."""
    folder = Path(args.out) / "sections" / name
    folder.mkdir(parents=True, exist_ok=True)
    result_file = folder / "result.json"
    result_file.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "unetdist.bench.gpu_check", "section", name, "--mode", args.mode,
            "--out", str(folder), "--data", str(Path(args.out) / "data")]
    if name == args.break_section:
        argv.append("--crash")
    if name == args.hang_section:
        argv.append("--hang")
    start = time.monotonic()
    with open(folder / "section.log", "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.wait()
            code = None
    entry: dict[str, Any] = {"name": name, "seconds": round(time.monotonic() - start, 1), "limit_s": round(limit),
                             "log": str(folder / "section.log"), "figures": {}, "detail": ""}
    if code is None:
        return {**entry, "status": "timeout", "detail": f"killed at its {limit:.0f} s limit"}
    if result_file.is_file():
        result = json.loads(result_file.read_text())
        entry.update(figures=result.get("figures", {}), detail=result.get("detail", ""))
        if "error" in result:
            return {**entry, "status": "error", "detail": result["error"]}
        return {**entry, "status": "pass" if result.get("passed") and code == 0 else "fail"}
    tail = (folder / "section.log").read_text(errors="replace").strip().splitlines()[-3:]
    return {**entry, "status": "error", "detail": f"exit {code} without a result: {' | '.join(tail)[-400:]}"}


def run_all(args: argparse.Namespace) -> int:
    names = args.sections.split(",") if args.sections else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"gpu_check: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    report: dict[str, Any] = {"schema": SCHEMA, "mode": args.mode, "deadline_s": args.deadline_s, "sections": []}
    for name in names:
        remaining = args.deadline_s - (time.monotonic() - start)
        own = args.limit_s or SECTIONS[name][1 if args.mode == "gpu" else 2]
        if remaining < MIN_START_S:
            entry = {"name": name, "status": "skipped", "seconds": 0, "limit_s": own, "figures": {},
                     "detail": f"not started: {remaining:.0f} s of the {args.deadline_s:.0f} s deadline left"}
        else:
            print(f"[gpu_check {time.monotonic() - start:5.0f}s] {name} (limit {min(own, remaining):.0f}s)", flush=True)
            entry = run_section(name, args, min(own, remaining))
        report["sections"].append(entry)
        report["passed"] = all(s["status"] == "pass" for s in report["sections"])
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))  # after every section
    report["seconds"] = round(time.monotonic() - start, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    table = format_table(report)
    (out / "gpu_check.txt").write_text(table + "\n")
    print(table)
    return 0 if report["passed"] else 1


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_figure(v)}" for k, v in value.items()) + "}"
    return str(value)


def format_table(report: dict[str, Any]) -> str:
    """One line per section: status, time against its limit, detail; then its figures."""
    lines = [f"GPU check ({report['mode']}): {'PASSED' if report['passed'] else 'FAILED'} "
             f"in {report.get('seconds', 0):.0f} s", f"{'section':<10} {'status':<8} {'time':>11}  detail"]
    for s in report["sections"]:
        lines.append(f"{s['name']:<10} {s['status']:<8} {s['seconds']:>5.0f}/{s['limit_s']:<4}s  {s['detail']}")
        for key, value in s["figures"].items():
            lines.append(f"{'':<10}   {key} = {_figure(value)}")
    return "\n".join(lines)


def section_main(args: argparse.Namespace) -> int:
    """Inside the child: run one section and write its result.json (an exception is an `error`)."""
    from unetdist.bench.gpu_sections import Ctx

    out = Path(args.out)
    if args.crash:
        os.abort()  # stands for a CUDA error that kills the process (SIGABRT, no Python exception)
    if args.hang:
        time.sleep(10**6)  # stands for a collective that never returns
    module, function = SECTIONS[args.name][0].split(":")
    ctx = Ctx(args.mode, out, Path(args.data))
    try:
        result = getattr(importlib.import_module(module), function)(ctx)
    except Exception as exc:  # noqa: BLE001 - reported as this section's error, the others still run
        import traceback

        traceback.print_exc()
        (out / "result.json").write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:600]}))
        return 1
    (out / "result.json").write_text(json.dumps(result, default=str))
    return 0


def worker_train(argv: list[str]) -> int:
    """Under torchrun: join the group (recording its backend), then the real `python -m unetdist.train`."""
    from unetdist.parallel.collectives import group_backend
    from unetdist.parallel.env import init_distributed
    from unetdist.train.__main__ import main as train

    proof = Path(argv[argv.index("--proof") + 1])
    argv = argv[: argv.index("--proof")] + argv[argv.index("--proof") + 2:]
    env = init_distributed()
    backend = group_backend()
    proof.write_text(json.dumps({"backend": backend, "initialized": backend is not None, "device": str(env.device)}))
    return train(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker-train"]:
        return worker_train(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m unetdist.bench.gpu_check")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="every section, each in its own process and time limit")
    run.add_argument("--mode", choices=("gpu", "dry"), default="gpu")
    run.add_argument("--out", required=True)
    run.add_argument("--sections", help=f"comma-separated subset of {', '.join(SECTIONS)} (default: all)")
    run.add_argument("--deadline-s", type=float, default=420.0, help="no section starts after this (default 420)")
    run.add_argument("--limit-s", type=float, help="one time limit for every section (default: each its own)")
    run.add_argument("--break", dest="break_section", help="make this section crash (checks the isolation)")
    run.add_argument("--hang", dest="hang_section", help="make this section hang (checks the time limits)")
    one = sub.add_parser("section", help="one section (run starts these)")
    one.add_argument("name", choices=list(SECTIONS))
    one.add_argument("--mode", choices=("gpu", "dry"), default="gpu")
    one.add_argument("--out", required=True)
    one.add_argument("--data", required=True)
    one.add_argument("--crash", action="store_true")
    one.add_argument("--hang", action="store_true")
    args = parser.parse_args(argv)
    return run_all(args) if args.command == "run" else section_main(args)


if __name__ == "__main__":
    sys.exit(main())
