"""The work plan: every unit predicted exactly once, by contiguous runs of about equal cost, the same on every rank."""

from __future__ import annotations

import pytest

from unetdist.infer.plan import Unit, owner, runs, split_units


def _units(files: list[tuple[int, int, int]]) -> list[Unit]:
    """(frames, chunk rows, cost per unit) per file -> the ordered units."""
    return [Unit(i, f, r, cost) for i, (frames, rows, cost) in enumerate(files) for f in range(frames)
            for r in range(rows)]


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("files", [
    [(1, 1, 6)] * 5,  # five small images
    [(1, 20, 40), (1, 1, 4), (1, 1, 1)],  # one huge field of view
    [(30, 1, 6), (1, 1, 6)],  # a long time-lapse
    [(3, 10, 20)],  # a few huge frames
])
def test_every_unit_once_contiguous_and_balanced(files: list[tuple[int, int, int]], world: int) -> None:
    units = _units(files)
    share = split_units(units, world)
    assert len(share) == world and [u for part in share for u in part] == units, "all units, once, in order"
    assert share == split_units(units, world), "deterministic"
    total = sum(u.cost for u in units)
    biggest = max(u.cost for u in units)
    for part in share:
        assert abs(sum(u.cost for u in part) - total / world) <= biggest, "about a fair share each"


def test_huge_image_is_split_into_bands_and_runs_group_consecutive_rows() -> None:
    units = _units([(1, 20, 40), (1, 1, 4)])
    share = split_units(units, 2)
    assert {u.file for u in share[0]} == {0} and share[1][0].file == 0, "both ranks get rows of the huge image"
    groups = runs(share[1])
    assert [[(u.file, u.row) for u in g] for g in groups] == [[(0, r) for r in range(10, 20)], [(1, 0)]]
    assert runs([Unit(0, 0, 0, 1), Unit(0, 0, 2, 1), Unit(0, 1, 3, 1), Unit(0, 1, 4, 1), Unit(0, 1, 5, 1, col=1)]) == [
        [Unit(0, 0, 0, 1)], [Unit(0, 0, 2, 1)], [Unit(0, 1, 3, 1), Unit(0, 1, 4, 1)], [Unit(0, 1, 5, 1, col=1)]
    ], "gaps, frames and column blocks split runs"


def test_owners_and_errors() -> None:
    assert [owner(i, 3) for i in range(5)] == [0, 1, 2, 0, 1]
    assert split_units([], 2) == [[], []]
    with pytest.raises(ValueError, match="world_size"):
        split_units([], 0)
