"""bench.draw_floor: the expectation it sums is exact, its packing is the densest, and no real layout gives
fewer blocks in expectation (what makes the figure a floor)."""

from __future__ import annotations

import itertools
import random

import pytest

from bench.draw_floor import densest_counts, draw_floor, expected_blocks


def _exact(counts: list[int], k: int) -> float:
    """Mean distinct blocks over every k-subset of the records (block b holds counts[b] of them)."""
    block_of = [b for b, c in enumerate(counts) for _ in range(c)]
    subsets = list(itertools.combinations(range(len(block_of)), k))
    return sum(len({block_of[i] for i in s}) for s in subsets) / len(subsets)


@pytest.mark.parametrize("counts,k", [([3, 2, 1], 2), ([4, 1, 1, 1], 3), ([2, 2, 2], 1), ([5], 2), ([1, 1, 1, 1], 4)])
def test_expected_blocks_is_the_mean_over_every_draw(counts: list[int], k: int) -> None:
    assert expected_blocks(counts, sum(counts), k) == pytest.approx(_exact(counts, k))


def test_densest_counts_fills_with_the_smallest_first_and_splits_at_a_block_end() -> None:
    assert densest_counts([4, 1, 2, 1], 4) == [3, 1]
    assert densest_counts([3, 3], 4) == pytest.approx([1 + 1 / 3, 2 / 3])
    assert sum(densest_counts([5, 7, 1, 9, 2], 8)) == pytest.approx(5)


def test_no_layout_that_fits_the_blocks_touches_fewer_blocks() -> None:
    rng = random.Random(7)
    for _ in range(300):
        sizes = [rng.randint(1, 9) for _ in range(rng.randint(2, 14))]
        usable = rng.randint(max(sizes), 20)
        order = sizes[:]
        rng.shuffle(order)
        counts, room = [0], usable  # any placement: records in some order, a new block when one does not fit
        for s in order:
            if s > room or rng.random() < 0.2:
                counts.append(0)
                room = usable
            counts[-1] += 1
            room -= s
        k = rng.randint(1, len(sizes))
        floor = expected_blocks(densest_counts(sizes, usable), len(sizes), k)
        assert expected_blocks(counts, len(sizes), k) >= floor - 1e-9


def test_a_sessions_trace_has_a_floor_at_least_the_per_request_one() -> None:
    r = draw_floor("sessions", 0, 0.25)
    assert r["requests"] > 0 and r["draw_floor"] >= r["floor_per_request"] >= 1.0
    with pytest.raises(ValueError, match="draw floor"):
        draw_floor("locomo", 0, 0.25)
