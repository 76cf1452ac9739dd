"""Sliding-window prediction of whole images and evaluation against label images.

`load_model_file` (checkpoints, run folders, exported model files), `SlidingWindowPredictor`
(one frame), `stream_logits` (a frame row block by row block), `predict_files` (files in, OME-TIFF or
OME-Zarr out, 1 process or torchrun, resumable), `evaluate_files` (metrics and reports); the notebook
API `load_model` / `predict_image` is re-exported by `unetdist` itself.
Names resolve lazily so `unetdist --help` does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PredictOptions", "SlidingWindowPredictor", "evaluate_files", "load_model_file", "predict_files",
           "stream_logits"]

_WHERE = {
    "PredictOptions": "unetdist.infer.predict",
    "SlidingWindowPredictor": "unetdist.infer.predict",
    "evaluate_files": "unetdist.infer.report",
    "load_model_file": "unetdist.infer.model_file",
    "predict_files": "unetdist.infer.run",
    "stream_logits": "unetdist.infer.stream",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'unetdist.infer' has no attribute {name!r}")
