"""The U-Net model and its analytic FLOP count (pure PyTorch, nothing distributed)."""

from unetdist.model.unet import UNet

__all__ = ["UNet"]
