"""Ranking eligible accounts: which ones take the signal when `max_accounts` keeps only some.

Each factor is a number in [0, 1], higher is better:

* **margin**: margin still free for new orders (the tighter of free margin above
  `min_free_margin` and room under `max_margin_use_pct`), as a share of equity;
* **risk_budget**: the tightest of the risk limits the account has (daily risk budget, daily
  loss, drawdown), as the share of that limit still left; 1 when it has none;
* **health**: from recent rejects and failures, supplied by the caller (1 = healthy);
* **quality**: execution quality (fill rate, slippage), supplied by the caller (1 = best);
* **correlation**: 1 / (1 + correlated open risk in % of equity) -- the trade adds the least
  correlated risk where the account holds the least of the same bet.

The score is the weighted mean with `portfolios.X.score_weights` (0.30/0.25/0.20/0.15/0.10 by
default). Ranking is by score, ties in account id order rotated like the remainder lots.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from orch_worker.domain.config import ScoreWeights

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

FACTORS = ("margin", "risk_budget", "health", "quality", "correlation")


def _share(left: FloatArray, whole: FloatArray) -> FloatArray:
    out = np.divide(left, whole, out=np.zeros(left.shape), where=whole > 0)
    return np.clip(out, 0.0, 1.0, out=out)


def margin_factor(margin_left: FloatArray, equity: FloatArray) -> FloatArray:
    return _share(margin_left, equity)


def risk_budget_factor(lefts: list[FloatArray], wholes: list[FloatArray], n: int) -> FloatArray:
    """Per account, the minimum over its risk limits of left / limit; limits an account does
    not have (NaN) are ignored, and an account with none scores 1."""
    out = np.ones(n)
    for left, whole in zip(lefts, wholes, strict=True):
        share = _share(left, whole)
        share[np.isnan(left) | np.isnan(whole)] = 1.0
        np.minimum(out, share, out=out)
    return out


def correlation_factor(correlated_open: FloatArray, equity: FloatArray) -> FloatArray:
    pct = np.divide(
        100.0 * correlated_open, equity, out=np.full(len(equity), np.inf), where=equity > 0
    )
    out: FloatArray = 1.0 / (1.0 + pct)
    return out


def combine(weights: ScoreWeights, parts: dict[str, FloatArray]) -> FloatArray:
    """The weighted mean of the factors."""
    w = {name: float(getattr(weights, name)) for name in FACTORS}
    total_w = sum(w.values())
    out = np.zeros(len(parts["margin"]))
    for name in FACTORS:
        out += parts[name] * (w[name] / total_w)
    return out


def rank(scores: FloatArray, tie_rank: IntArray, count: int | None = None) -> IntArray:
    """Indices of the `count` best (all by default), best first: highest score, ties by
    `tie_rank`."""
    key = -scores
    if count is None or count >= len(key):
        return np.lexsort((tie_rank, key)).astype(np.int64)
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    # Only the best `count` (and whoever ties with the last of them) need a full sort.
    cut = np.partition(key, count - 1)[count - 1]
    near = np.flatnonzero(key <= cut)
    best = near[np.lexsort((tie_rank[near], key[near]))]
    return best[:count].astype(np.int64)
