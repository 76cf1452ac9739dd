"""Which stages of the UNet an activation checkpointing policy names.

Why this module exists: the FLOP count (recomputed stages cost one more forward) and the
checkpointing wrapper in the parallel layer must agree on the stages a policy covers; the
model owns its stages, so the rule lives here, below both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Policy -> highest resolution level checkpointed (level 0 = full resolution, 1 = half, ...).
# Activation memory per level falls about 2x per level down (4x fewer pixels, 2x more channels),
# so levels 0 and 1 hold about three quarters of it; "highres" pays recomputation only there
# (default model, 256x256, batch 2: it keeps 38% of the saved bytes for +15% step FLOPs, "all"
# keeps 19% for +33%).
POLICY_MAX_LEVEL: dict[str, int | None] = {"none": -1, "highres": 1, "all": None}
POLICIES: tuple[str, ...] = tuple(POLICY_MAX_LEVEL)


def select_stages(stages: Sequence[tuple[str, Any, int]], policy: str) -> list[str]:
    """Names of the stages a policy checkpoints.

    Args:
        stages: ``(name, module, level)`` triples, as ``UNet.stages()`` returns them.
        policy: ``none``, ``highres`` (levels 0 and 1) or ``all`` (every stage).

    Raises:
        ValueError: for an unknown policy, naming it and the valid ones.
    """
    if policy not in POLICY_MAX_LEVEL:
        raise ValueError(
            f"unknown activation checkpointing policy {policy!r}; valid policies: {', '.join(POLICIES)}"
        )
    max_level = POLICY_MAX_LEVEL[policy]
    return [name for name, _, level in stages if max_level is None or level <= max_level]
