"""unetdist: distributed U-Net training for tiled microscopy images.

The small public API users' scripts rely on lives here; everything else is reached through
submodules (``unetdist.model``, ``unetdist.train``, ...) so that importing the package stays cheap.
"""

from unetdist.dist.checkpointing import apply_activation_checkpointing

__version__ = "0.1.0"

__all__ = ["__version__", "apply_activation_checkpointing"]
