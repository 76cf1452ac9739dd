"""The spatial augmentation of a whole batch on the training device (`data.augment.device: cuda`).

Why this module exists: crop, rotation, scaling and the elastic deformation cost one resampling
of every tile; in loader workers that is CPU time per sample, and a node with few cores per GPU
becomes loader bound (nnU-Net is known for it). Here the loader only draws each sample's geometry
(`augment.draw_spatial`, from the same per-position generator, so the draws are those of the
CPU path) and ships it as a few numbers; the trainer resamples the batch in one ``grid_sample``
on its device. For the same draws the output equals `augment.apply_spatial`'s up to float
rounding of the sampling coordinates: the flip is folded into the coordinate grid (an exact
permutation), and samples with nothing to interpolate sample integer positions.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from unetdist.data.augment import SpatialDraw, cubic_matrix

_FIXED = 6  # start y, start x, cos(angle)/zoom, sin(angle)/zoom, flip code, elastic flag


def pack_draw(draw: SpatialDraw, grid: int) -> np.ndarray:
    """One sample's geometry as ``6 + 2 * grid**2`` float32 numbers (a row of the batch's ``spatial``)."""
    row = np.zeros(_FIXED + 2 * grid * grid, np.float32)
    row[:_FIXED] = (draw.start[0], draw.start[1], math.cos(draw.angle) / draw.zoom,
                    math.sin(draw.angle) / draw.zoom, draw.code, draw.coarse is not None)
    if draw.coarse is not None:
        row[_FIXED:] = draw.coarse.ravel()
    return row


def coordinates(params: torch.Tensor, crop: int) -> torch.Tensor:
    """N x 2 x crop x crop source (y, x) of every output pixel, as `augment.sample_coordinates` + flip."""
    n, device = params.shape[0], params.device
    centre = (crop - 1) / 2.0
    offsets = torch.arange(crop, dtype=torch.float32, device=device) - centre
    start_y, start_x, cos, sin = (params[:, i, None, None] for i in range(4))
    ys = (cos * offsets[:, None]) - (sin * offsets[None, :]) + (start_y + centre)
    xs = (sin * offsets[:, None]) + (cos * offsets[None, :]) + (start_x + centre)
    coords = torch.stack([ys, xs], dim=1)
    elastic = params[:, 5] > 0
    if bool(elastic.any()):
        grid = math.isqrt((params.shape[1] - _FIXED) // 2)
        matrix = torch.from_numpy(cubic_matrix(grid, crop)).to(device)
        coarse = params[elastic, _FIXED:].reshape(-1, 2, grid, grid)
        coords[elastic] += matrix @ coarse @ matrix.T
    codes = params[:, 4].round().long().tolist()
    return torch.stack([_flip(coords[i], code) for i, code in enumerate(codes)]) if n else coords


def _flip(coords: torch.Tensor, code: int) -> torch.Tensor:
    """`augment.dihedral_all`'s transform on the coordinate grid: the output pixels permuted alike."""
    coords = torch.rot90(coords, code % 4, dims=(-2, -1))
    return coords.flip(-1) if code >= 4 else coords


def spatial_batch(params: torch.Tensor, crop: int, image: torch.Tensor, label: torch.Tensor,
                  weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Resample an N x C x T x T batch (labels N x T x T, weights N x T x T) to N x C x crop x crop.

    Image and weights linearly, labels by nearest neighbour, mirrored at the tile border, as the
    loader's `augment.resample`; all tensors on ``params``'s device.
    """
    height, width = label.shape[-2:]
    coords = coordinates(params, crop)
    grid = torch.stack([coords[:, 1] * (2.0 / max(width - 1, 1)) - 1.0,
                        coords[:, 0] * (2.0 / max(height - 1, 1)) - 1.0], dim=-1)
    planes = [image.float()] + ([weight[:, None].float()] if weight is not None else [])
    linear = F.grid_sample(torch.cat(planes, dim=1), grid, mode="bilinear", padding_mode="reflection",
                           align_corners=True)
    nearest = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="reflection",
                            align_corners=True)[:, 0]
    channels = image.shape[1]
    out_weight = linear[:, channels] if weight is not None else None
    return linear[:, :channels].to(image.dtype), nearest.to(label.dtype), out_weight
