"""Argument parsing for `unetdist bench` (and `bench train`, `bench smoke`, `bench loader`).

`unetdist bench [train]` runs the whole table, `unetdist bench smoke` checks that training works
on the device first (the GPU check runs both), `unetdist bench loader` measures the data
pipeline alone (implemented in `unetdist.bench.loader`). Implementations are imported
only when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from unetdist.data.console import add_log_file, deprecated_alias


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="auto", choices=["auto", "tiny", "cpu", "gpu"],
                   help="sizes: gpu (the default model, 512px tiles), cpu (width 16, 128px), tiny (CI smoke); "
                        "auto: gpu on CUDA, else cpu")
    p.add_argument("--out", help="output folder for JSON and log (default: runs/bench/PRESET)")
    p.add_argument("--data-dir", help="benchmark dataset folder, made once and reused (default: data/bench-...)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--width", type=int, help="override the preset's model base width")
    p.add_argument("--tile", type=int, help="override the preset's tile size")
    p.add_argument("--batch-size", type=int, help="override the preset's per-device batch")
    deprecated_alias(p, "--batch", "--batch-size", type=int)
    p.add_argument("--steps", type=int, help="override the timed steps per lever row (smoke: training steps)")


def _train_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--workers", type=int, help="override the DataLoader workers of both trainers")
    p.add_argument("--only", help="comma-separated sections to run: reference, levers, ddp, memory")
    p.add_argument("--skip", help="comma-separated sections to leave out")
    p.add_argument("--memory-budget-gb", type=float,
                   help="memory budget for the headroom section (default: 92%% of the GPU; CPU: the preset's, 80)")
    p.add_argument("--deadline-s", type=float,
                   help="time budget in seconds: sections and lever rows not started by then are skipped")
    p.add_argument("--memory-method", default="auto", choices=["auto", "meta"],
                   help="headroom from real GPU steps (auto on CUDA) or saved-tensor bytes on the meta device")


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    preset = args.preset if args.preset != "auto" else ("gpu" if _cuda() else "cpu")
    return Path("runs") / "bench" / preset


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _bench(args: argparse.Namespace) -> int:
    from unetdist.bench.report import format_table
    from unetdist.bench.run import run_bench

    args.out = str(_out_dir(args))
    add_log_file(Path(args.out) / "bench.log")
    report = run_bench(args)
    print(format_table(report))
    print(f"\nwrote {Path(args.out) / 'bench.json'} ({report['elapsed_s']:.0f} s)")
    return 1 if report["problems"] else 0


def _smoke(args: argparse.Namespace) -> int:
    from unetdist.bench.smoke import run_smoke

    args.out = str(_out_dir(args))
    add_log_file(Path(args.out) / "smoke.log")
    report = run_smoke(args)
    print(f"smoke on {report['machine']['device']} ({report['lever']}): loss "
          f"{report['loss']['first_mean']:.4f} -> {report['loss']['last_mean']:.4f}; checkpointing "
          f"{'matches' if report['checkpointing']['passed'] else 'DIFFERS'} "
          f"({report['checkpointing']['precision']}, tolerance {report['checkpointing']['tolerance']:g}): "
          f"{'PASSED' if report['passed'] else 'FAILED'}")
    return 0 if report["passed"] else 1


def _register_loader(sub: Any) -> None:
    from unetdist.bench.loader import add_loader_arguments

    p = sub.add_parser("loader", help="data pipeline throughput: samples/s of the shard reader and decoders")
    add_loader_arguments(p)
    p.set_defaults(func=_loader)


def _loader(args: argparse.Namespace) -> int:
    from unetdist.bench.loader import run_loader_bench

    return run_loader_bench(args)


def _predict(args: argparse.Namespace) -> int:
    from unetdist.bench.predict import format_table, run_predict_bench

    report = run_predict_bench(args)
    print(format_table(report))
    print(f"\nwrote {Path(args.out) / 'bench_predict.json'}")
    checks = report["checks"]
    return 0 if all(v for k, v in checks.items() if k.endswith("_ok")) else 1


def _register_predict(sub: Any) -> None:
    from unetdist.bench.predict import add_arguments

    p = sub.add_parser("predict", help="peak RSS and megapixels/s of whole-slide prediction, 1 and N ranks")
    add_arguments(p)
    p.set_defaults(func=_predict)


def _shard(args: argparse.Namespace) -> int:
    from unetdist.bench.shard import run_shard_bench

    add_log_file(Path(args.out) / "bench-shard.log")
    return run_shard_bench(args)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: ours vs the reference trainer, levers, DDP, MFU, memory headroom",
                       description="Without a subcommand: the same as `unetdist bench train`.")
    _train_arguments(p)
    p.set_defaults(func=_bench)
    bench_sub = p.add_subparsers(dest="bench_command", metavar="{train,smoke,loader,shard,predict}")
    train = bench_sub.add_parser("train", help="the training table (the default)")
    _train_arguments(train)
    train.set_defaults(func=_bench)
    smoke = bench_sub.add_parser("smoke", help="loss falls over N steps; checkpointing equivalence on the device")
    _common(smoke)
    smoke.set_defaults(func=_smoke)
    _register_loader(bench_sub)
    from unetdist.bench.shard import add_shard_arguments

    shard = bench_sub.add_parser("shard", help="peak memory and megapixels/s of `unetdist shard` on whole-slide "
                                               "OME-TIFFs (5k and 20k pixels square)")
    add_shard_arguments(shard)
    shard.set_defaults(func=_shard)
    _register_predict(bench_sub)
