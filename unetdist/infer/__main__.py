"""Entry point for torchrun: `python -m unetdist.infer predict|evaluate ...` (same as `unetdist predict|evaluate`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from unetdist.config import UsageError
from unetdist.data.console import main as run_main
from unetdist.data.console import new_parser
from unetdist.parallel.collectives import barrier
from unetdist.parallel.env import destroy_distributed, init_distributed, launch_rank, launch_world_size

if TYPE_CHECKING:
    from unetdist.infer.report import EvalOptions


def predict_main(args: argparse.Namespace) -> int:
    from unetdist.infer.run import options_from_args, predict_files

    options, outputs = options_from_args(args)
    options.validate()
    env = init_distributed()
    try:
        predict_files(args.model, args.images, Path(args.out), options, outputs, env, args.axes, args.interior_class,
                      args.min_size)
    finally:
        destroy_distributed()
    return 0


def evaluate_main(args: argparse.Namespace) -> int:
    from unetdist.infer.io import expand_inputs
    from unetdist.infer.report import EvalOptions, evaluate_files

    if (args.pred is None) == (args.model is None):
        raise UsageError("give either --pred (predicted label images) or --model with --images")
    if args.model is not None and not args.images:
        raise UsageError("--model needs --images (the raw images to predict)")
    out = Path(args.out)
    labels = expand_inputs(args.labels)
    images = expand_inputs(args.images) if args.images else None
    preds = expand_inputs(args.pred) if args.pred is not None else None
    labels, images, preds = _pair_for_evaluation(args, labels, images, preds)
    opts = EvalOptions(num_classes=args.num_classes, label_type=args.label_type, iou_threshold=args.iou_threshold,
                       interior_class=args.interior_class, min_size=args.min_size, overlays=args.overlays)
    if args.pred is not None:
        metrics = evaluate_files(preds, labels, out, opts, images)
        _print(metrics, out)
        return 0
    return _predict_then_evaluate(args, labels, images or [], opts, out)


def _pair_for_evaluation(args: argparse.Namespace, labels: list[Path], images: list[Path] | None,
                         preds: list[Path] | None) -> tuple[list[Path], list[Path] | None, list[Path] | None]:
    """Labels, images and predictions in matching order, paired by name (never by position)."""
    from unetdist.data.inputs import pair_files

    def single(patterns: list[str]) -> str | None:
        return patterns[0] if len(patterns) == 1 else None

    if preds is not None:  # `unetdist predict` writes NAME_labels.tif
        pairs = pair_files(preds, labels, single(args.pred), single(args.labels), args.mask_suffix, "_labels",
                           ("prediction", "label"))
        preds, labels = [p for p, _ in pairs], [l for _, l in pairs]
    if images is not None:
        pairs = pair_files(images, labels, single(args.images), single(args.labels), args.mask_suffix)
        by_label = {l: i for i, l in pairs}
        images = [by_label[l] for l in labels]
    return labels, images, preds


def _predict_then_evaluate(args: argparse.Namespace, labels: list[Path], images: list[Path], opts: EvalOptions,
                           out: Path) -> int:
    from dataclasses import replace

    from unetdist.infer.report import check_shapes, evaluate_files
    from unetdist.infer.run import options_from_args, predict_files

    check_shapes(images, labels, args.axes)  # before any prediction: a mismatch found afterwards wastes the run
    options, outputs = options_from_args(args)
    options.validate()
    outputs = replace(outputs, format="tiff")  # evaluation reads whole label images
    env = init_distributed()
    try:
        summary = predict_files(args.model, [str(p) for p in images], out / "predictions", options, outputs, env,
                                args.axes, args.interior_class, args.min_size)
        if env.is_main:
            preds = [Path(f["labels"]) for f in summary["files"]]
            opts = replace(opts, num_classes=opts.num_classes or summary["model"]["hparams"]["num_classes"])
            speed = {k: summary[k] for k in ("megapixels", "seconds", "megapixels_per_s", "world_size", "device")}
            metrics = evaluate_files(preds, labels, out, opts, images, {"model": summary["model"], "prediction": speed})
            _print(metrics, out)
        barrier(env)
    finally:
        destroy_distributed()
    return 0


def _print(metrics: dict, out: Path) -> None:
    pooled = metrics["pooled"]
    inst = pooled["instances"]
    print(f"pooled over {len(metrics['images'])} image(s): Dice fg {pooled['dice']['foreground']:.4f}, "
          f"IoU fg {pooled['iou']['foreground']:.4f}, objects F1 {inst['f1']:.4f} "
          f"(precision {inst['precision']:.4f}, recall {inst['recall']:.4f}); reports in {out}")


def build_parser() -> argparse.ArgumentParser:
    """`predict` and `evaluate`, registered by the same function as under `unetdist`."""
    from unetdist.infer.commands import register

    parser = new_parser("python -m unetdist.infer", __doc__)
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """torchrun needs a module to start: `predict` and `evaluate` with the arguments `unetdist` gives them."""
    return run_main(build_parser(), argv, lambda args: f"unetdist {args.command}", launch_rank(), launch_world_size())


if __name__ == "__main__":
    sys.exit(main())
