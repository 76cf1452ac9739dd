"""Pictures a person can judge at a glance: the image with true and predicted outlines.

Why this module exists: a Dice of 0.9 can hide merged nuclei or a missed cell type; outlines on
the image show what went wrong. Truth is drawn green, prediction magenta, and where the two
outlines coincide white. The image is contrast-stretched to its 0.5/99.5 percentiles; small
images are enlarged (nearest neighbour) so 1-pixel outlines stay visible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TRUE_COLOUR = (0, 230, 0)
PRED_COLOUR = (255, 0, 255)
BOTH_COLOUR = (255, 255, 255)
_LEGEND_HEIGHT = 14
_MIN_SIDE = 512


def outlines(instances: np.ndarray) -> np.ndarray:
    """Boolean map of object pixels that touch (4-neighbours) a pixel with another id or the image border."""
    padded = np.pad(instances, 1, mode="constant", constant_values=0)
    centre = padded[1:-1, 1:-1]
    edge = np.zeros(instances.shape, bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        edge |= padded[1 + dy:padded.shape[0] - 1 + dy, 1 + dx:padded.shape[1] - 1 + dx] != centre
    return edge & (instances > 0)


def display_image(image: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3 of a C x H x W (or H x W) image: RGB when C == 3, else channel 0 in grey."""
    image = np.asarray(image, np.float64)
    if image.ndim == 2:
        image = image[None]
    planes = image[:3] if image.shape[0] == 3 else np.repeat(image[:1], 3, axis=0)
    lo, hi = np.percentile(planes, [0.5, 99.5])
    scaled = np.clip((planes - lo) / max(hi - lo, 1e-9), 0.0, 1.0)
    return (np.moveaxis(scaled, 0, -1) * 255).round().astype(np.uint8)


def render_overlay(image: np.ndarray, true_inst: np.ndarray, pred_inst: np.ndarray) -> np.ndarray:
    """uint8 H' x W' x 3 picture (without legend), enlarged by an integer factor when small."""
    if true_inst.shape != pred_inst.shape or true_inst.shape != image.shape[-2:]:
        raise ValueError(f"image {image.shape}, truth {true_inst.shape} and prediction {pred_inst.shape} differ in size")
    rgb = display_image(image)
    t, p = outlines(true_inst), outlines(pred_inst)
    scale = max(1, _MIN_SIDE // max(true_inst.shape))
    if scale > 1:  # outlines then stay `scale` pixels wide
        rgb, t, p = (a.repeat(scale, 0).repeat(scale, 1) for a in (rgb, t, p))
    rgb[t & ~p] = TRUE_COLOUR
    rgb[p & ~t] = PRED_COLOUR
    rgb[t & p] = BOTH_COLOUR
    return rgb


def save_overlay(path: Path, image: np.ndarray, true_inst: np.ndarray, pred_inst: np.ndarray, title: str = "") -> Path:
    """Write the overlay as PNG with a one-line legend above it."""
    from PIL import Image, ImageDraw

    picture = render_overlay(image, true_inst, pred_inst)
    canvas = Image.new("RGB", (picture.shape[1], picture.shape[0] + _LEGEND_HEIGHT), (0, 0, 0))
    canvas.paste(Image.fromarray(picture), (0, _LEGEND_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    x = 2
    for text, colour in ((f"{title}  " if title else "", (200, 200, 200)), ("truth ", TRUE_COLOUR),
                         ("prediction ", PRED_COLOUR), ("both", BOTH_COLOUR)):
        draw.text((x, 1), text, fill=colour)
        x += int(draw.textlength(text))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
