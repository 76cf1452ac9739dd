"""The notebook API: `load_model` once, then `predict_image(model, array)` for arrays of any size.

Why this module exists: in a notebook people hold images as arrays (from napari, tifffile, zarr)
and want arrays back, without files, command lines or process groups. It uses the same
sliding-window predictor and row-by-row streaming as `unetdist predict`, so results are the same
as the command's; the input is read row band by row band, so a zarr or memory-mapped array larger
than memory works too (the outputs are numpy arrays, so they must fit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unetdist.data.manifest import IntensityStats
from unetdist.infer.instances import label_instances
from unetdist.infer.io import frame_layout
from unetdist.infer.model_file import ModelInfo, load_model_file
from unetdist.infer.predict import PredictOptions, SlidingWindowPredictor
from unetdist.infer.source import InputImage
from unetdist.infer.stream import stream_logits
from unetdist.model import UNet


@dataclass
class Model:
    """A loaded model: the network, the intensity normalisation it was trained with, where it came from."""

    net: UNet
    stats: IntensityStats
    info: ModelInfo
    device: torch.device


def load_model(path: str | Path, device: str | torch.device = "auto") -> Model:
    """Load a checkpoint, run folder (its newest checkpoint) or exported model file.

    Args:
        path: what `unetdist predict` accepts as MODEL.
        device: ``auto`` (CUDA when available, else CPU), or any torch device.
    """
    net, stats, info = load_model_file(path)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Model(net, stats, info, torch.device(device))


def predict_image(model: Model, image: Any, axes: str = "auto", *, tile: int = 256, overlap: int = 64,
                  batch_size: int = 4, tta: bool = False, probabilities: bool = False, instances: bool = False,
                  min_size: int = 0) -> dict[str, np.ndarray]:
    """Segment one image (numpy, zarr, dask... anything sliced like numpy) of any size.

    Args:
        model: from `load_model`.
        image: 2-D (Y, X), or with channel and/or frame axes; see `axes`.
        axes: letters over T, C, Y, X in the array's order (``auto``: as `unetdist predict` reads a
            file without metadata, e.g. a 1-channel model takes a 3-D array as frames).
        tile, overlap, batch_size, tta: the sliding windows (see `unetdist predict --help`).
        probabilities, instances: also return those.
        min_size: instances smaller than this many pixels are dropped.

    Returns:
        ``labels`` (uint8, the image's shape without channels), with ``probabilities`` (float32,
        classes first, then the frame axes) and ``instances`` (int32) when asked for.
    """
    shape = tuple(int(n) for n in image.shape)
    layout = frame_layout(Path("<array>"), shape, None, model.info.in_channels, axes)
    source = InputImage(Path("<array>"), layout.axes, shape, np.dtype(image.dtype), {}, image)
    options = PredictOptions(tile=tile, overlap=overlap, batch_size=batch_size, tta=tta)
    predictor = SlidingWindowPredictor(model.net, model.stats, options, model.device)
    frames, k = source.frame_shape, predictor.num_classes
    out = {"labels": np.zeros(frames + (source.height, source.width), np.uint8)}
    if probabilities:
        out["probabilities"] = np.zeros((k,) + frames + (source.height, source.width), np.float32)
    for f in range(source.frames):
        index = source.frame_index(f)
        for y, logits in stream_logits(predictor, source.frame(f), 0, source.height):
            rows = slice(y, y + logits.shape[1])
            out["labels"][index + (rows,)] = logits.argmax(0).numpy()
            if probabilities:
                out["probabilities"][(slice(None),) + index + (rows,)] = logits.softmax(0).numpy()
    if instances:
        flat = out["labels"].reshape(-1, source.height, source.width)
        out["instances"] = np.stack([label_instances(f, k, min_size=min_size) for f in flat]).reshape(
            out["labels"].shape)
    return out
