"""Which rank predicts what: whole files per rank, or one big file shared by all ranks (pure).

Why this module exists: every rank must derive the same plan from the same file geometries,
with no communication, and each output must be written by exactly one rank. Kept pure so the
rules can be tested without processes.

Rules:
- A file is *shared* when it alone costs more than a fair share (total windows / world size),
  e.g. one huge field of view, or a long stack. Shared files are done first, one at a time,
  by all ranks together, in rounds: a stack with at least as many frames as ranks deals whole
  frames (round k: frame k * world + r to rank r); otherwise each frame is cut into contiguous
  bands of window rows, one per rank. After each round the ranks send their weighted sums to
  the file's owner (rank = file index mod world), which blends and writes.
- Every other file is done whole by one rank: largest first, each to the least-loaded rank
  (ties: lowest rank), so ranks finish at about the same time.
"""

from __future__ import annotations

from dataclasses import dataclass

from unetdist.infer.windows import split_rows


@dataclass(frozen=True)
class FileCost:
    """A file's work: `frames` frames of `windows` windows in `rows` window rows each."""

    frames: int
    windows: int
    rows: int

    @property
    def total(self) -> int:
        return self.frames * self.windows


@dataclass(frozen=True)
class Piece:
    """Rank `rank` predicts window rows [rows[0], rows[1]) of frame `frame`."""

    rank: int
    frame: int
    rows: tuple[int, int]


@dataclass(frozen=True)
class SharedFile:
    """A file all ranks predict together; `owner` blends and writes it."""

    index: int
    owner: int
    rounds: tuple[tuple[Piece, ...], ...]


@dataclass(frozen=True)
class Plan:
    """`shared` files first (all ranks, in order), then `whole[r]`: the files rank r does alone."""

    shared: tuple[SharedFile, ...]
    whole: tuple[tuple[int, ...], ...]

    def windows_of(self, rank: int, costs: list[FileCost]) -> int:
        """Windows rank `rank` predicts (for its progress bar)."""
        count = sum(costs[i].total for i in self.whole[rank])
        for shared in self.shared:
            for piece in (p for r in shared.rounds for p in r if p.rank == rank):
                count += (piece.rows[1] - piece.rows[0]) * (costs[shared.index].windows // costs[shared.index].rows)
        return count


def make_plan(costs: list[FileCost], world_size: int) -> Plan:
    """The plan for files with `costs` on `world_size` ranks (see the module rules)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    total = sum(c.total for c in costs)
    shared_idx = [i for i, c in enumerate(costs) if world_size > 1 and c.total * world_size > total]
    shared = tuple(SharedFile(i, i % world_size, _rounds(costs[i], world_size)) for i in shared_idx)
    loads = [0] * world_size
    whole: list[list[int]] = [[] for _ in range(world_size)]
    rest = sorted((i for i in range(len(costs)) if i not in shared_idx), key=lambda i: (-costs[i].total, i))
    for i in rest:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        whole[rank].append(i)
        loads[rank] += costs[i].total
    return Plan(shared, tuple(tuple(sorted(files)) for files in whole))


def _rounds(cost: FileCost, world_size: int) -> tuple[tuple[Piece, ...], ...]:
    if cost.frames >= world_size:
        return tuple(
            tuple(Piece(r, start + r, (0, cost.rows)) for r in range(min(world_size, cost.frames - start)))
            for start in range(0, cost.frames, world_size)
        )
    return tuple(
        tuple(Piece(r, frame, rows) for r, rows in enumerate(split_rows(cost.rows, world_size)))
        for frame in range(cost.frames)
    )
