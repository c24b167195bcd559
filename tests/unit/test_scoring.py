"""Scoring and selection: `max_accounts` keeps the best-scored eligible accounts, the rest are
the plan's ranked alternatives for reroutes."""

from __future__ import annotations

import numpy as np
import pytest

from orch_worker.domain.scoring import (
    correlation_factor,
    margin_factor,
    rank,
    risk_budget_factor,
)
from tests.unit.planning_helpers import config, plan, shares, signal, state, states


def four() -> dict[str, object]:
    # Free margin as a share of equity: ACC-1 0.9, ACC-2 0.3, ACC-3 0.6, ACC-4 0.1
    return states(
        state("ACC-1", margin_available="90000"),
        state("ACC-2", margin_available="30000"),
        state("ACC-3", margin_available="60000"),
        state("ACC-4", margin_available="10000"),
    )


def test_max_accounts_keeps_the_best_and_ranks_the_rest_as_alternatives() -> None:
    p = plan(signal("1.00"), four(), config(4, max_accounts=2))

    assert shares(p) == {"ACC-1": "0.50", "ACC-3": "0.50"}
    assert p.alternatives == ("ACC-2", "ACC-4")
    assert p.numbers["eligible"] == 4
    assert p.numbers["selected"] == 2
    assert all("score" in a.numbers for a in p.allocations)


def test_alternatives_are_capped_by_max_alternatives() -> None:
    p = plan(signal("1.00"), four(), config(4, max_accounts=1, max_alternatives=2))

    assert shares(p) == {"ACC-1": "1.00"}
    assert p.alternatives == ("ACC-3", "ACC-2")


def test_health_and_execution_quality_from_the_context_count() -> None:
    p = plan(
        signal("1.00"),
        four(),
        config(4, max_accounts=2),
        health={"ACC-1": 0.0},
        quality={"ACC-1": 0.2},
    )

    # score = 0.30 margin + 0.25 risk budget + 0.20 health + 0.15 quality + 0.10 correlation:
    # ACC-1 0.27 + 0.25 + 0 + 0.03 + 0.10 = 0.65, ACC-2 0.79, ACC-3 0.88, ACC-4 0.73
    assert set(shares(p)) == {"ACC-2", "ACC-3"}
    assert p.alternatives == ("ACC-4", "ACC-1")


def test_score_weights_are_configurable() -> None:
    weights = {"margin": 0, "risk_budget": 0, "health": 0, "quality": 1, "correlation": 0}

    p = plan(
        signal("1.00"),
        four(),
        config(4, max_accounts=1, score_weights=weights),
        quality={"ACC-4": 1.0, "ACC-1": 0.5, "ACC-2": 0.5, "ACC-3": 0.5},
    )

    assert shares(p) == {"ACC-4": "1.00"}


def test_risk_budget_headroom_counts_the_tightest_risk_limit() -> None:
    cfg = config(2, max_accounts=1, rules={"max_daily_loss_pct": "5"})
    accounts = states(
        state("ACC-1", equity="96000", day_start_equity="100000"),  # 20% of its loss limit left
        state("ACC-2", equity="100000", margin_available="80000"),  # all of it, less margin
    )

    p = plan(signal(), accounts, cfg)

    assert shares(p) == {"ACC-2": "1.00"}


def test_equal_scores_rank_in_account_order_rotated() -> None:
    accounts = states(state("ACC-1"), state("ACC-2"), state("ACC-3"))

    picked = [
        next(iter(shares(plan(signal(), accounts, config(3, max_accounts=1), rotation=r))))
        for r in range(3)
    ]

    assert picked == ["ACC-1", "ACC-2", "ACC-3"]


def test_factors() -> None:
    assert margin_factor(np.array([50.0, 200.0, 10.0]), np.array([100.0, 100.0, 0.0])).tolist() == [
        0.5,
        1.0,
        0.0,
    ]
    lefts = [np.array([10.0, np.nan, 5.0]), np.array([50.0, 50.0, np.nan])]
    wholes = [np.array([100.0, np.nan, 10.0]), np.array([100.0, 100.0, 100.0])]
    assert risk_budget_factor(lefts, wholes, 3).tolist() == [0.1, 0.5, 0.5]
    assert risk_budget_factor([], [], 2).tolist() == [1.0, 1.0]
    assert correlation_factor(np.array([0.0, 1000.0]), np.array([100000.0, 100000.0])).tolist() == [
        1.0,
        0.5,
    ]


@pytest.mark.parametrize("count", [None, 1, 2, 5])
def test_rank_is_by_score_then_tie_order(count: int | None) -> None:
    scores = np.array([0.5, 0.9, 0.5, 0.7, 0.5])
    tie = np.array([4, 3, 2, 1, 0])

    order = rank(scores, tie, count).tolist()

    assert order == [1, 3, 4, 2, 0][: count if count is not None else 5]
