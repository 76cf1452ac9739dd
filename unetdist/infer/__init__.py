"""Sliding-window prediction of whole images and evaluation against label images.

`load_model_file` (checkpoints, run folders, exported model files), `SlidingWindowPredictor`
(one frame), `predict_files` (files, 1 process or torchrun), `evaluate_files` (metrics and reports).
Names resolve lazily so `unetdist --help` does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PredictOptions", "SlidingWindowPredictor", "evaluate_files", "load_model_file", "predict_files"]

_WHERE = {
    "PredictOptions": "unetdist.infer.predict",
    "SlidingWindowPredictor": "unetdist.infer.predict",
    "evaluate_files": "unetdist.infer.report",
    "load_model_file": "unetdist.infer.model_file",
    "predict_files": "unetdist.infer.run",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'unetdist.infer' has no attribute {name!r}")
