"""The work plan: every file and window row predicted exactly once, balanced, and the same on every rank."""

from __future__ import annotations

import pytest

from unetdist.infer.plan import FileCost, make_plan


def _coverage(plan, costs: list[FileCost]) -> dict[int, list]:
    """For each file: the (frame, row) cells predicted, with repeats."""
    cells: dict[int, list] = {i: [] for i in range(len(costs))}
    for files in plan.whole:
        for i in files:
            cells[i] += [(t, r) for t in range(costs[i].frames) for r in range(costs[i].rows)]
    for shared in plan.shared:
        for pieces in shared.rounds:
            assert len({p.rank for p in pieces}) == len(pieces), "one piece per rank and round"
            cells[shared.index] += [(p.frame, r) for p in pieces for r in range(*p.rows)]
    return cells


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("costs", [
    [FileCost(1, 6, 2)] * 5,  # five equal images
    [FileCost(1, 400, 20), FileCost(1, 4, 2), FileCost(1, 1, 1)],  # one huge field of view
    [FileCost(30, 6, 2), FileCost(1, 6, 2)],  # a long time-lapse
    [FileCost(3, 200, 10)],  # a few huge frames
])
def test_everything_once(costs: list[FileCost], world: int) -> None:
    plan = make_plan(costs, world)
    for i, cells in _coverage(plan, costs).items():
        expected = [(t, r) for t in range(costs[i].frames) for r in range(costs[i].rows)]
        assert sorted(cells) == expected, f"file {i}"
    assert sum(plan.windows_of(r, costs) for r in range(world)) == sum(c.total for c in costs)
    assert plan == make_plan(costs, world), "deterministic"


def test_five_images_on_two_ranks_are_dealt_whole() -> None:
    plan = make_plan([FileCost(1, 6, 2)] * 5, 2)
    assert plan.shared == () and plan.whole == ((0, 2, 4), (1, 3))


def test_huge_image_is_split_into_bands_of_window_rows() -> None:
    plan = make_plan([FileCost(1, 400, 20), FileCost(1, 4, 2)], 2)
    (shared,) = plan.shared
    assert shared.index == 0 and shared.owner == 0 and len(shared.rounds) == 1
    assert [(p.rank, p.rows) for p in shared.rounds[0]] == [(0, (0, 10)), (1, (10, 20))]
    assert plan.whole == ((), (1,)) or plan.whole == ((1,), ())


def test_long_stack_is_dealt_frame_by_frame() -> None:
    plan = make_plan([FileCost(5, 6, 2), FileCost(1, 6, 2)], 2)
    (shared,) = plan.shared
    assert [[(p.rank, p.frame) for p in r] for r in shared.rounds] == [[(0, 0), (1, 1)], [(0, 2), (1, 3)], [(0, 4)]]
    assert all(p.rows == (0, 2) for r in shared.rounds for p in r)


def test_one_rank_shares_nothing() -> None:
    plan = make_plan([FileCost(1, 400, 20), FileCost(1, 4, 2)], 1)
    assert plan.shared == () and plan.whole == ((0, 1),)
