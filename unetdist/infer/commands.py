"""Argument parsing for `unetdist predict` and `unetdist evaluate` (implementations load lazily)."""

from __future__ import annotations

import argparse

from unetdist.data.console import deprecated_alias, model_option, positional_model

BLENDS = ("gaussian", "constant")  # unetdist.infer.windows.BLENDS, literal here so --help needs no numpy


def _predict(args: argparse.Namespace) -> int:
    from unetdist.config import UsageError
    from unetdist.infer.__main__ import predict_main

    legacy = positional_model(args, args.legacy, "predict")
    if legacy:  # the old form `unetdist predict MODEL IMAGES...`
        args.images = (args.images or []) + legacy
    if not args.images:
        raise UsageError("--images is required: image files, folders or quoted globs to segment")
    return predict_main(args)


def _evaluate(args: argparse.Namespace) -> int:
    from unetdist.infer.__main__ import evaluate_main

    return evaluate_main(args)


def _window_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sliding windows")
    g.add_argument("--tile", type=int, default=256, help="window size in pixels")
    g.add_argument("--overlap", type=int, default=64, help="minimum overlap of neighbouring windows")
    g.add_argument("--margin", type=int, default=None,
                   help="pixels discarded at a window's inner edges, at most overlap/2 (default: overlap/4)")
    g.add_argument("--blend", choices=BLENDS, default="gaussian",
                   help="gaussian (sigma = tile / 8) or constant (plain averaging)")
    g.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="of the forward pass; auto: bf16 on GPUs with bf16 hardware (A100, H100, ...), else fp32")
    g.add_argument("--tta", action="store_true", help="average over the 4 flips (4x the compute)")
    g.add_argument("--axes", default="auto", help="stored image axes over T, C, Z, Y, X, e.g. TZCYX (default: auto, as "
                                                  "`unetdist shard` reads them)")
    g.add_argument("--interior-class", type=int, default=None,
                   help="class whose connected components seed instances (default: 1 of 2 classes, 2 of 3)")
    g.add_argument("--min-size", type=int, default=0, help="drop instances smaller than this many pixels")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="segment whole images with a trained model (sliding windows, blended)",
                       description="Segment TIFF/PNG/npy images of any size. Runs alone or under torchrun "
                                   "(python -m torch.distributed.run --nproc_per_node=N -m unetdist.infer predict ...).")
    model_option(p)
    p.add_argument("--images", nargs="+", help="image files, folders or quoted globs ('raw/img_*.tif') (required)")
    p.add_argument("legacy", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--out", required=True, help="output folder: <name>_labels.tif|.zarr [, _probs, _instances]")
    p.add_argument("--probabilities", action="store_true", help="also write softmax probabilities")
    p.add_argument("--prob-dtype", choices=("float32", "uint8"), default="float32",
                   help="float32, or uint8 scaled to 0..255")
    p.add_argument("--instances", action="store_true", help="also write instance ids (touching nuclei separated "
                                                            "when the model has a boundary class)")
    g = p.add_argument_group("output files")
    g.add_argument("--format", choices=("auto", "zarr", "tiff"), default="auto",
                   help="OME-Zarr or tiled OME-TIFF; auto: zarr for frames above --zarr-above")
    g.add_argument("--zarr-above", type=float, default=64.0, help="auto format threshold, megapixels per frame")
    g.add_argument("--chunk", type=int, default=1024, help="chunk size in pixels: zarr chunks and the unit of "
                                                          "work shared between ranks and resumed")
    g.add_argument("--ngff", choices=("0.4", "0.5"), default="0.4", help="OME-NGFF version of zarr outputs "
                                                                         "(0.4: zarr v2, 0.5: zarr v3)")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs and partial predictions")
    _window_options(p)
    p.set_defaults(func=_predict)

    p = sub.add_parser("evaluate", help="Dice, IoU and instance F1 of predictions against label images",
                       description="Score label images written by `unetdist predict` (--pred), or run a model "
                                   "first (--model with --images). Labels are paired with images and predictions by name.")
    p.add_argument("--labels", nargs="+", required=True, help="true label images (class indices), paired by name: "
                   "NAME.tif with NAME_masks.tif (--mask-suffix) or NAME_labels.tif (predictions), the same NAME "
                   "in another folder, or what a glob's * matches")
    p.add_argument("--mask-suffix", default="_masks", help="label names are image names plus this suffix")
    p.add_argument("--pred", nargs="+", help="predicted label images")
    model_option(p, required=False)  # predict with it first
    deprecated_alias(p, "--checkpoint", "--model")
    p.add_argument("--images", nargs="+", help="the raw images: needed with --model, and for overlays")
    p.add_argument("--label-type", choices=("classes", "instances"), default="classes",
                   help="label files hold class indices, or instance ids (then they are the true objects)")
    p.add_argument("--out", required=True, help="output folder: metrics.json/.md/.csv, overlays/")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes incl. background (default: the model's, or the largest label + 1)")
    p.add_argument("--iou-threshold", type=float, default=0.5, help="object match threshold")
    p.add_argument("--overlays", type=int, default=4, help="overlay pictures for the images with the lowest F1")
    _window_options(p)
    p.set_defaults(func=_evaluate, probabilities=False, prob_dtype="float32", instances=False, legacy=[], format="tiff",
                   zarr_above=64.0, chunk=1024, ngff="0.4", overwrite=True)
