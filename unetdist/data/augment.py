"""Training augmentations: the 8 flips/90-degree rotations of a square tile (the dihedral group D4).

Microscopy has no preferred orientation, so these are free, exact (no interpolation) and keep
labels aligned. The transform of each sample is a pure function of its position in the stream
(`augment_code`), not of a running RNG, so a resumed stream can skip samples without decoding
them and still give every later sample the same transform.
"""

from __future__ import annotations

import numpy as np

NUM_TRANSFORMS = 8


def augment_code(seed: int, rank: int, lane: int, epoch: int, position: int) -> int:
    """Which of the 8 transforms sample `position` of a stream gets, in [0, 8)."""
    sequence = np.random.SeedSequence([seed % 2**63, rank, lane, epoch, position, 0xA06])
    return int(sequence.generate_state(1)[0] % NUM_TRANSFORMS)


def dihedral(image: np.ndarray, label: np.ndarray, code: int) -> tuple[np.ndarray, np.ndarray]:
    """Apply transform `code`: rotate by 90 x (code % 4) degrees, then mirror left-right if code >= 4.

    `image` is C x H x W and `label` H x W; both get the same transform. Code 0 is the identity.
    """
    if not 0 <= code < NUM_TRANSFORMS:
        raise ValueError(f"transform code must be in [0, {NUM_TRANSFORMS}), got {code}")
    turns, mirror = code % 4, code >= 4
    image, label = np.rot90(image, turns, axes=(-2, -1)), np.rot90(label, turns, axes=(-2, -1))
    if mirror:
        image, label = image[..., ::-1], label[..., ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)
