"""unetdist: distributed U-Net training for tiled microscopy images.

The small public API users' scripts rely on lives here; everything else is reached through
submodules (``unetdist.model``, ``unetdist.train``, ...). Names are resolved lazily so that
``unetdist --help`` and config errors do not wait for torch to import.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "apply_activation_checkpointing", "load_model", "predict_image"]


def __getattr__(name: str) -> Any:
    if name == "apply_activation_checkpointing":
        from unetdist.parallel.checkpointing import apply_activation_checkpointing

        return apply_activation_checkpointing
    if name in ("load_model", "predict_image"):
        from unetdist.infer import api

        return getattr(api, name)
    raise AttributeError(f"module 'unetdist' has no attribute {name!r}")
