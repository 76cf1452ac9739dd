"""`unetdist predict`: files in, label/probability/instance images out, on 1 process or under torchrun.

Why this module exists: it joins the pieces (model file, lazy inputs, plan, streamed prediction,
work stores). Rank 0 checks the inputs and outputs and prepares each input's work store (or finds
what a killed run already did) and broadcasts the result, so every rank derives the same plan;
then each rank predicts its units and writes their chunks itself (no pixels travel between ranks),
and after a barrier each file's owner finishes it. Memory is bounded by one window row of the
widest input, not by the image.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from unetdist.data.progress import Progress
from unetdist.infer.instances import label_instances
from unetdist.infer.io import expand_inputs
from unetdist.infer.model_file import load_model_file
from unetdist.infer.plan import Unit, owner, runs, split_units
from unetdist.infer.predict import PredictOptions, SlidingWindowPredictor, warn_unusual_intensity
from unetdist.infer.source import InputImage, open_input
from unetdist.infer.store import OutputSpec, WorkStore, finish, fingerprint, output_name
from unetdist.infer.stream import stream_logits
from unetdist.infer.windows import touching
from unetdist.parallel.collectives import barrier, broadcast_object
from unetdist.parallel.env import DistEnv

log = logging.getLogger(__name__)

SUMMARY = "predict.json"


def predict_files(model_path: str | Path, inputs: list[str], out_dir: Path, options: PredictOptions,
                  outputs: OutputSpec, env: DistEnv, axes: str = "auto", interior_class: int | None = None,
                  min_size: int = 0) -> dict[str, Any]:
    """Predict every input; returns the run summary (also written by rank 0 to `out_dir/predict.json`).

    `inputs` are files, OME-Zarr folders or globs; `axes` is "auto" or the images' stored axes.
    The summary's ``written`` lists the outputs this rank finished (each output is finished by one rank).
    """
    options.validate()
    outputs.validate()
    model, stats, info = load_model_file(model_path)
    predictor = SlidingWindowPredictor(model, stats, options, env.device)
    model_id = {"path": str(info.path), "step": info.step, "hparams": info.hparams}
    run_options = {**asdict(options), "margin": options.resolved_margin, "batch_size": None}
    agreed = _agreed_inputs(env, inputs, info.in_channels, out_dir, axes, outputs, model_id, run_options)
    if env.is_main:
        _warn_unusual(agreed, info, predictor, axes)
    stores = [_store(path, info.in_channels, axes, out_dir, outputs, predictor.num_classes) for path, _ in agreed]
    todo = [Unit(i, f, r, _cost(predictor, stores[i], r, c), c)
            for i, (_, done) in enumerate(agreed) for f, r, c in stores[i].units if (f, r, c) not in done]
    mine = split_units(todo, env.world_size)[env.rank]
    desc = "predict" if env.world_size == 1 else f"predict, rank 0 of {env.world_size}"
    bar = Progress(sum(u.cost for u in mine), desc, "window", enabled=env.is_main)
    start = time.perf_counter()
    try:
        for group in runs(mine):
            with open_input(agreed[group[0].file][0], info.in_channels, axes) as image:  # one file open at a time
                _predict_run(predictor, image, stores[group[0].file], group, bar.update)
    finally:
        bar.close()
    barrier(env)
    instances = functools.partial(label_instances, num_classes=predictor.num_classes,
                                  interior_class=interior_class, min_size=min_size)
    written = [p for i, store in enumerate(stores) if owner(i, env.world_size) == env.rank
               for p in finish(store, instances)]
    barrier(env)
    seconds = time.perf_counter() - start
    summary = _summary(info, options, outputs, stores, todo, env, seconds)
    if env.is_main:
        (out_dir / SUMMARY).write_text(json.dumps(summary, indent=1))
        log.info("predicted %d file(s), %.2f megapixels in %.2f s: %.3f megapixels/s on %d rank(s)",
                 len(stores), summary["megapixels"], seconds, summary["megapixels_per_s"], env.world_size)
    return {**summary, "written": [str(p) for p in written]}


def _warn_unusual(agreed: list[tuple[Path, Any]], info: Any, predictor: SlidingWindowPredictor, axes: str) -> None:
    """One warning per input whose first frame's intensities are far from the training images' (sampled regions)."""
    for path, _ in agreed:
        with open_input(path, info.in_channels, axes) as image:
            warn_unusual_intensity(path, [image.frame(0)], predictor.norm, str(info.data.get("dtype", "")))


def _agreed_inputs(env: DistEnv, inputs: list[str], in_channels: int, out_dir: Path, axes: str, outputs: OutputSpec,
                   model_id: dict, run_options: dict) -> list[tuple[Path, set[tuple[int, int, int]]]]:
    """Rank 0 checks inputs and outputs and prepares the work stores; every rank gets (path, units done) or the
    error."""
    result: Any = None
    if env.is_main:
        try:
            result = _prepare(inputs, in_channels, out_dir, axes, outputs, model_id, run_options)
        except (OSError, ValueError) as exc:
            result = exc
    result = broadcast_object(env, result)
    if isinstance(result, BaseException):
        raise result
    return result


def _prepare(inputs: list[str], in_channels: int, out_dir: Path, axes: str, outputs: OutputSpec, model_id: dict,
             run_options: dict) -> list[tuple[Path, set[tuple[int, int, int]]]]:
    paths = expand_inputs(inputs)
    names: dict[str, Path] = {}
    for path in paths:
        name = output_name(path)
        if name in names:
            raise ValueError(f"{names[name]} and {path} would both write {name}_labels; rename one or predict "
                             "them into different folders")
        names[name] = path
    out_dir.mkdir(parents=True, exist_ok=True)
    result = []
    for path in paths:
        with open_input(path, in_channels, axes) as image:
            store = WorkStore(out_dir, image, outputs, int(model_id["hparams"]["num_classes"]))
            done = store.prepare(fingerprint(image, model_id, run_options, outputs))
        if done:
            log.info("%s: continuing a partial prediction, %d of %d units already done", path, len(done),
                     len(store.units))
        result.append((path, done))
    return result


def _store(path: Path, in_channels: int, axes: str, out_dir: Path, outputs: OutputSpec, classes: int) -> WorkStore:
    """The work store of one input (its geometry and pixel size are read, and the file closed again)."""
    with open_input(path, in_channels, axes) as image:
        return WorkStore(out_dir, image, outputs, classes)


def _cost(predictor: SlidingWindowPredictor, store: WorkStore, row: int, col: int) -> int:
    """Windows a unit streams when predicted alone."""
    image, chunk = store.image, store.spec.chunk
    grid = predictor.grid(image.height, image.width)
    rows = touching(grid.ys, grid.h, row * chunk, min((row + 1) * chunk, image.height))
    cols = touching(grid.xs, grid.w, *store.columns(col))
    return (rows[1] - rows[0]) * (cols[1] - cols[0])


def _predict_run(predictor: SlidingWindowPredictor, image: InputImage, store: WorkStore, group: list[Unit],
                 progress: Any) -> None:
    """Stream consecutive chunk rows of one column block of a frame; write each unit once its rows are complete.

    Blocks are turned into labels (and probabilities) as they arrive, so only one unit of outputs
    (uint8 labels: chunk x block width bytes) waits to be written, never a unit of logits.
    """
    chunk = store.spec.chunk
    y0, y1 = group[0].row * chunk, min((group[-1].row + 1) * chunk, image.height)
    pending: list[dict[str, np.ndarray]] = []
    row, filled = group[0].row, 0
    frame, col = group[0].frame, group[0].col
    for _, logits in stream_logits(predictor, image.frame(frame), y0, y1, progress, store.columns(col)):
        while logits.shape[1]:
            size = min((row + 1) * chunk, image.height) - row * chunk
            part, logits = logits[:, :size - filled], logits[:, size - filled:]
            pending.append(store.outputs_of(part))
            filled += part.shape[1]
            if filled == size:
                store.write_unit(frame, row, col, {k: np.concatenate([p[k] for p in pending], axis=-2)
                                                   for k in pending[0]})
                pending, row, filled = [], row + 1, 0


def _summary(info: Any, options: PredictOptions, outputs: OutputSpec, stores: list[WorkStore], todo: list[Unit],
             env: DistEnv, seconds: float) -> dict[str, Any]:
    megapixels = sum(s.image.frames * s.image.height * s.image.width for s in stores) / 1e6
    share = split_units(todo, env.world_size)
    rank_of = {(u.file, u.frame, u.row, u.col): r for r, units in enumerate(share) for u in units}
    return {
        "model": {"path": str(info.path), "kind": info.kind, "step": info.step, "hparams": info.hparams},
        "options": {**asdict(options), "margin": options.resolved_margin},
        "outputs": asdict(outputs),
        "world_size": env.world_size,
        "device": str(env.device),
        "files": [{"input": str(s.image.path), "shape": list(s.image.shape), "axes": s.image.axes,
                   "frames": s.image.frames, "format": s.fmt, "labels": str(s.finals()[0]),
                   "outputs": [str(p) for p in s.finals()], "units": len(s.units),
                   "ranks": sorted({r for k, r in rank_of.items() if k[0] == i}), "owner": owner(i, env.world_size)}
                  for i, s in enumerate(stores)],
        "units_predicted": len(todo),
        "megapixels": megapixels,
        "seconds": seconds,
        "megapixels_per_s": megapixels * len(todo) / max(1, sum(len(s.units) for s in stores)) / max(seconds, 1e-9),
    }


def options_from_args(args: argparse.Namespace) -> tuple[PredictOptions, OutputSpec]:
    """The `unetdist predict` flags (shared by `unetdist evaluate --model`) as option objects."""
    predict = PredictOptions(tile=args.tile, overlap=args.overlap, margin=args.margin, blend=args.blend,
                             batch_size=args.batch_size, precision=args.precision, tta=args.tta)
    outputs = OutputSpec(probabilities=args.probabilities, prob_dtype=args.prob_dtype, instances=args.instances,
                         format=args.format, zarr_above=args.zarr_above, chunk=args.chunk, ngff=args.ngff,
                         overwrite=args.overwrite)
    return predict, outputs
