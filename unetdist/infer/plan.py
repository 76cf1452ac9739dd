"""Which rank predicts what: units of work (a block of chunks of one frame) split by cost (pure).

Why this module exists: every rank must derive the same plan from the same list of units, with
no communication, and every unit must be predicted by exactly one rank. Units are kept in order
(file, frame, column block, chunk row) and each rank gets one contiguous run of them whose cost (windows) is
about a 1/world share: a huge image is split into bands of chunk rows, many small images are dealt
whole, and a rank streams its consecutive rows of a frame in one pass (no window predicted twice
inside a run: it streams down one column block). Each file is finished (pyramid, metadata, TIFF
export) by rank `index % world`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Unit:
    """Chunk row `row` of column block `col` of frame `frame` of input `file`, costing `cost` windows."""

    file: int
    frame: int
    row: int
    cost: int
    col: int = 0


def split_units(units: list[Unit], world_size: int) -> list[list[Unit]]:
    """Contiguous runs of `units`, one per rank, of about equal cost (a unit goes where its cost midpoint falls)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    total = sum(u.cost for u in units) or 1
    out: list[list[Unit]] = [[] for _ in range(world_size)]
    before = 0
    for unit in units:
        rank = min(world_size - 1, int((before + unit.cost / 2) * world_size // total))
        out[rank].append(unit)
        before += unit.cost
    return out


def runs(units: list[Unit]) -> list[list[Unit]]:
    """Consecutive chunk rows of the same frame and column block, grouped (each group is streamed in one pass)."""
    groups: list[list[Unit]] = []
    for unit in units:
        last = groups[-1][-1] if groups else None
        if last is not None and (last.file, last.frame, last.col, last.row + 1) == (unit.file, unit.frame, unit.col,
                                                                                  unit.row):
            groups[-1].append(unit)
        else:
            groups.append([unit])
    return groups


def owner(file: int, world_size: int) -> int:
    """The rank that finishes file number `file`."""
    return file % world_size
