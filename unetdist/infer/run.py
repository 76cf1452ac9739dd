"""`unetdist predict`: files in, label/probability/instance images out, on 1 process or under torchrun.

Why this module exists: it joins the pieces (model file, geometry probe, plan, sliding-window
predictor, writers) and owns the only collective communication of prediction. Rank 0 probes the
inputs and broadcasts their geometry, so every rank derives the same plan (`plan.py`); shared
files are predicted by all ranks in lock-step rounds whose weighted sums go to the file's owner
with point-to-point sends; all other files are predicted and written by one rank each.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from unetdist.data.normalize import Normalization
from unetdist.data.progress import Progress
from unetdist.parallel.collectives import barrier, broadcast_object, recv, send
from unetdist.parallel.env import DistEnv
from unetdist.infer.instances import label_instances
from unetdist.infer.io import (FrameLayout, OutputPaths, OutputWriter, expand_inputs, output_paths, probe_layout,
                               read_frames)
from unetdist.infer.model_file import ModelInfo, load_model_file
from unetdist.infer.plan import FileCost, Plan, SharedFile, make_plan
from unetdist.infer.predict import Band, PredictOptions, SlidingWindowPredictor, warn_unusual_intensity

log = logging.getLogger(__name__)

SUMMARY = "predict.json"


@dataclass(frozen=True)
class OutputOptions:
    """What is written besides the label image.

    Attributes:
        probabilities: also write softmax probabilities (K x H x W per frame).
        prob_dtype: ``float16`` or ``float32``.
        instances: also write instance ids (see `unetdist.infer.instances`).
        interior_class: seed class for instances (None: by the number of classes).
        min_size: instances smaller than this many pixels are dropped.
    """

    probabilities: bool = False
    prob_dtype: str = "float16"
    instances: bool = False
    interior_class: int | None = None
    min_size: int = 0


@dataclass(frozen=True)
class InputFile:
    path: Path
    layout: FrameLayout
    out: OutputPaths


@dataclass
class Context:
    """What every step of one prediction run needs."""

    env: DistEnv
    predictor: SlidingWindowPredictor
    outputs: OutputOptions
    progress: Callable[[int], None]
    trained_dtype: str = ""  # the training images' dtype, for the out-of-range warning


def predict_files(model_path: str | Path, inputs: list[str], out_dir: Path, options: PredictOptions,
                  outputs: OutputOptions, env: DistEnv, axes: str = "auto") -> dict[str, Any]:
    """Predict every input; returns the run summary (also written by rank 0 to `out_dir/predict.json`).

    `inputs` are files, folders or globs; `axes` is "auto" or the images' axes (see `unetdist.infer.io`).
    The summary's ``written`` lists the files this rank wrote (each output is written by one rank).
    """
    options.validate()
    model, stats, info = load_model_file(model_path)
    files = _agreed_inputs(env, inputs, info.in_channels, out_dir, axes)
    predictor = SlidingWindowPredictor(model, stats, options, env.device)
    grids = [predictor.grid(f.layout.height, f.layout.width) for f in files]
    costs = [FileCost(f.layout.frames, len(g), g.rows) for f, g in zip(files, grids)]
    plan = make_plan(costs, env.world_size)
    desc = "predict" if env.world_size == 1 else f"predict, rank 0 of {env.world_size}"
    bar = Progress(plan.windows_of(env.rank, costs), desc, "window", enabled=env.is_main)
    ctx = Context(env, predictor, outputs, bar.update, str(info.data.get("dtype", "")))
    start = time.perf_counter()
    written: list[Path] = []
    try:
        for shared in plan.shared:
            written += _predict_shared(ctx, shared, files[shared.index])
        written += _predict_whole(ctx, [files[i] for i in plan.whole[env.rank]])
    finally:
        bar.close()
    barrier(env)
    seconds = time.perf_counter() - start
    summary = _summary(info, stats, options, outputs, files, plan, env, seconds)
    if env.is_main:
        (out_dir / SUMMARY).write_text(json.dumps(summary, indent=1))
        log.info("predicted %d file(s), %.2f megapixels in %.2f s: %.3f megapixels/s on %d rank(s)",
                 len(files), summary["megapixels"], seconds, summary["megapixels_per_s"], env.world_size)
    return {**summary, "written": [str(p) for p in written]}


def _agreed_inputs(env: DistEnv, inputs: list[str], in_channels: int, out_dir: Path, axes: str) -> list[InputFile]:
    """Rank 0 finds and probes the inputs; every rank gets its answer, or raises its error."""
    result: Any = None
    if env.is_main:
        try:
            paths = expand_inputs(inputs)
            layouts = [probe_layout(p, in_channels, axes) for p in paths]
            result = [InputFile(p, lay, o) for p, lay, o in zip(paths, layouts, output_paths(paths, out_dir))]
            out_dir.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as exc:
            result = exc
    result = broadcast_object(env, result)
    if isinstance(result, BaseException):
        raise result
    return result


def _finish_frame(ctx: Context, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Labels, probabilities and instances of one frame from its blended logits."""
    labels = logits.argmax(0).to(torch.uint8).numpy()
    o = ctx.outputs
    probs = logits.softmax(0).numpy().astype(o.prob_dtype) if o.probabilities else None
    instances = (label_instances(labels, ctx.predictor.num_classes, o.interior_class, o.min_size)
                 if o.instances else None)
    return labels, probs, instances


def _writer(ctx: Context, file: InputFile) -> OutputWriter:
    o = ctx.outputs
    return OutputWriter(file.out, file.layout, ctx.predictor.num_classes, o.prob_dtype if o.probabilities else None,
                        o.instances)


def _predict_whole(ctx: Context, files: list[InputFile]) -> list[Path]:
    """Files this rank does alone, reading the next file while predicting the current one."""
    written: list[Path] = []
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read_frames, files[0].path, files[0].layout) if files else None
        for k, file in enumerate(files):
            assert pending is not None
            frames = pending.result()
            warn_unusual_intensity(file.path, frames, ctx.predictor.norm, ctx.trained_dtype)
            pending = reader.submit(read_frames, files[k + 1].path, files[k + 1].layout) if k + 1 < len(files) else None
            writer = _writer(ctx, file)
            try:
                for frame in frames:
                    writer.add(*_finish_frame(ctx, ctx.predictor.predict(frame, ctx.progress)))
                written += writer.close()
            except BaseException:
                writer.abort()
                raise
            log.debug("rank %d wrote %s", ctx.env.rank, file.out.labels)
    return written


def _predict_shared(ctx: Context, shared: SharedFile, file: InputFile) -> list[Path]:
    """One file predicted by all ranks in rounds; the owner blends the pieces and writes it."""
    env, predictor, layout = ctx.env, ctx.predictor, file.layout
    owner = env.rank == shared.owner
    frames = read_frames(file.path, layout) if any(p.rank == env.rank for r in shared.rounds for p in r) else None
    if owner and frames is not None:
        warn_unusual_intensity(file.path, frames, predictor.norm, ctx.trained_dtype)
    writer = _writer(ctx, file) if owner else None
    grid = predictor.grid(layout.height, layout.width)
    try:
        for pieces in shared.rounds:
            mine = {p.frame: predictor.accumulate(frames[p.frame], p.rows, ctx.progress)
                    for p in pieces if p.rank == env.rank}
            if not owner:
                for band in mine.values():
                    _send_band(band, shared.owner, env)
                continue
            sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            for p in pieces:
                band = mine[p.frame] if p.rank == env.rank else _recv_band(grid.band(p.rows), grid.width, p.rank, ctx)
                acc, weight = sums.setdefault(p.frame, (torch.zeros(predictor.num_classes, grid.height, grid.width),
                                                        torch.zeros(grid.height, grid.width)))
                acc[:, band.y0:band.y1] += band.acc
                weight[band.y0:band.y1] += band.weight
            for t in sorted(sums):
                logits = predictor.finalize(*sums.pop(t), layout.height, layout.width)
                writer.add(*_finish_frame(ctx, logits))
        return writer.close() if writer is not None else []
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def _send_band(band: Band, owner: int, env: DistEnv) -> None:
    for tensor in (band.acc, band.weight):
        send(tensor.to(env.device), owner)


def _recv_band(rows: tuple[int, int], width: int, src: int, ctx: Context) -> Band:
    y0, y1 = rows
    device = ctx.env.device
    acc = torch.empty(ctx.predictor.num_classes, y1 - y0, width, device=device)
    weight = torch.empty(y1 - y0, width, device=device)
    for tensor in (acc, weight):
        recv(tensor, src)
    return Band(y0, y1, acc.cpu(), weight.cpu())


def _summary(info: ModelInfo, norm: Normalization, options: PredictOptions, outputs: OutputOptions,
             files: list[InputFile], plan: Plan, env: DistEnv, seconds: float) -> dict[str, Any]:
    megapixels = sum(f.layout.pixels for f in files) / 1e6
    shared = {s.index for s in plan.shared}
    owner = {i: r for r, idx in enumerate(plan.whole) for i in idx} | {s.index: s.owner for s in plan.shared}
    return {
        "model": {"path": str(info.path), "kind": info.kind, "step": info.step, "hparams": info.hparams},
        "normalization": {**norm.to_dict(), **norm.stats.to_dict()},
        "options": {**asdict(options), "margin": options.resolved_margin},
        "outputs": asdict(outputs),
        "world_size": env.world_size,
        "device": str(env.device),
        "files": [{"input": str(f.path), "shape": list(f.layout.shape), "frames": f.layout.frames,
                   "labels": str(f.out.labels), "shared": i in shared, "rank": owner[i]}
                  for i, f in enumerate(files)],
        "megapixels": megapixels,
        "seconds": seconds,
        "megapixels_per_s": megapixels / max(seconds, 1e-9),
    }


def options_from_args(args: argparse.Namespace) -> tuple[PredictOptions, OutputOptions]:
    """The `unetdist predict` flags (shared by `unetdist evaluate --model`) as option objects."""
    predict = PredictOptions(tile=args.tile, overlap=args.overlap, margin=args.margin, blend=args.blend,
                             batch_size=args.batch_size, precision=args.precision, tta=args.tta)
    outputs = OutputOptions(probabilities=args.probabilities, prob_dtype=args.prob_dtype,
                            instances=args.instances, interior_class=args.interior_class, min_size=args.min_size)
    return predict, outputs
