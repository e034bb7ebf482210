"""Scoring users against item factors, one block at a time, without Spark."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from batch import evaluation, model
from batch.model import AlsParams

ITEMS = np.array([3, 5, 8, 13], dtype=np.int64)
FACTORS = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]])


def score(rows: list[tuple], k: int, exclusions: bool = False) -> list[tuple]:
    """``(user, factors[, excluded items])`` rows scored as one block, answers as tuples."""
    excluded = None
    if exclusions:
        excluded = (
            np.array([len(row[2]) for row in rows]),
            np.array([item for row in rows for item in row[2]], dtype=np.int64),
        )
    columns = model._score_block(
        np.array([row[0] for row in rows]),
        np.array([row[1] for row in rows], dtype=np.float64),
        excluded,
        ITEMS,
        FACTORS,
        k,
    )
    return [
        (int(user), int(item), float(value), int(position))
        for user, item, value, position in zip(*columns, strict=True)
    ]


def test_best_items_come_first_with_positions_from_one() -> None:
    assert score([(1, [2.0, 1.0])], k=3) == [(1, 8, 3.0, 1), (1, 3, 2.0, 2), (1, 13, 1.5, 3)]


def test_equal_scores_go_to_the_lower_item_id() -> None:
    assert [row[1] for row in score([(1, [1.0, 1.0])], k=4)] == [8, 3, 5, 13]


def test_excluded_items_are_never_returned_even_when_k_asks_for_more() -> None:
    rows = score([(1, [2.0, 1.0], [8, 3, 99])], k=4, exclusions=True)

    assert [(row[1], row[3]) for row in rows] == [(13, 1), (5, 2)]


def test_each_user_of_a_block_excludes_only_their_own_items() -> None:
    rows = score(
        [(1, [2.0, 1.0], [8]), (2, [2.0, 1.0], []), (3, [2.0, 1.0], [3, 13])], k=2, exclusions=True
    )

    assert [(row[0], row[1], row[3]) for row in rows] == [
        (1, 3, 1),
        (1, 13, 2),
        (2, 8, 1),
        (2, 3, 2),
        (3, 8, 1),
        (3, 5, 2),
    ]


def test_scores_that_are_not_numbers_are_dropped() -> None:
    rows = score([(1, [float("nan"), 1.0]), (2, [0.0, 1.0])], k=2)

    assert [row[0] for row in rows] == [2, 2]
    assert all(np.isfinite(row[2]) for row in rows)


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        (AlsParams(16, 0.1, 10.0, 10, 42), 4),  # already in the grid
        (AlsParams(12, 0.05, 10.0, 10, 42), 5),  # tried first, beside the grid
    ],
)
def test_the_first_round_tries_the_configured_pair_first_then_every_grid_pair(
    base: AlsParams, expected: int
) -> None:
    candidates = evaluation._pairs(base)

    assert candidates[0] == base
    assert len(candidates) == len(set(candidates)) == expected
    assert {replace(c, rank=base.rank, reg=base.reg) for c in candidates} == {base}


@pytest.mark.parametrize(
    ("best", "expected"),
    [
        (
            AlsParams(8, 0.01, 10.0, 10, 42),
            [(8, 0.01, 1.0, 10), (8, 0.01, 40.0, 10), (8, 0.01, 10.0, 5)],
        ),
        (
            AlsParams(16, 0.1, 20.0, 15, 42),  # neither value is in the grid
            [
                (16, 0.1, 1.0, 15),
                (16, 0.1, 10.0, 15),
                (16, 0.1, 40.0, 15),
                (16, 0.1, 20.0, 5),
                (16, 0.1, 20.0, 10),
            ],
        ),
    ],
)
def test_the_second_round_changes_alpha_or_iterations_of_the_best_pair_one_at_a_time(
    best: AlsParams, expected: list[tuple[Any, ...]]
) -> None:
    candidates = evaluation._around(best)

    assert [(c.rank, c.reg, c.alpha, c.iterations) for c in candidates] == expected
    assert {c.seed for c in candidates} == {best.seed}
