"""Sizing: how many lots each selected account takes. Integer lots, numpy arithmetic.

Every method is a weighted split of a total under per-account caps:

* `equal`: weight 1; `ratio`: the account's configured ratio; `equity`: its equity;
  `available_margin`: its margin_available. These split the signal's quantity pro rata.
* `risk`: weight = the lots that risk `risk_per_trade_pct` of equity at the stop distance,
  q = equity x pct / 100 / (value_per_unit x |entry - stop|); that target is also the account's
  cap, so each account takes its target (the signal's quantity, when given, is a ceiling on the
  total and shrinks every target in proportion).

The rules, in order:

1. **Caps and redistribution.** Shares are "water-filled": x_i = min(cap_i, lambda x w_i) with
   lambda chosen so the shares add up to the total. What a capped account cannot take goes to the
   others in proportion to their weights, as far as their own caps allow. The total never
   exceeds the request; if every account is capped, less is planned.
2. **Round down** each share to whole lots.
3. **Remainder.** The lots lost to rounding go one each to the accounts with the largest share
   first; ties (an equal split) go in account id order, rotated by `rotation` so that over many
   signals the extra lots take turns. An account already at its cap is skipped.
4. **Minimum quantity.** If the total cannot give every account the minimum, only as many
   accounts as can get it are kept (largest weight first, same tie order); any account whose
   rounded share is still below the minimum is dropped. Each drop re-splits among the rest.

Worked examples from broker documentation are reproduced in `tests/unit/test_allocation.py`.

At 10,000 accounts sorting is the cost, so nothing sorts more than it must: which accounts get a
remainder lot or are kept is a selection (`first`, linear), and the water-filling level sorts
only the prefix of accounts that can be capped -- with the same running sums, so the same shares
bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

_NONE: IntArray = np.zeros(0, dtype=np.int64)
_NONE.setflags(write=False)

_EPS = 1e-9
"""Float slack when flooring shares: x = 2.9999999999 is three lots, not two."""


def water_fill(total: float, weights: FloatArray, caps: FloatArray) -> FloatArray:
    """Shares x_i = min(cap_i, lambda x w_i) adding up to `total` (or every cap, if less).

    Sorted by cap/weight, the accounts that hit their caps come first; lambda is the smallest
    of the candidate levels that does not cap the next account. Only as many of the smallest
    ratios are sorted as it takes to find it (usually a few), no loop over rounds.
    """
    n = len(weights)
    if n == 0:
        return np.zeros(0)
    if caps.sum() <= total:
        return caps.astype(np.float64)
    weight_sum = weights.sum()
    if weight_sum > 0:  # the common case first: nobody capped, a plain pro-rata split
        plain: FloatArray = weights * (total / weight_sum)
        if (plain <= caps).all():
            return plain
    positive = weights > 0
    ratio = np.where(positive, caps / np.where(positive, weights, 1.0), np.inf)
    lam = _level(total, weights, caps, ratio, weight_sum)
    return np.where(positive, np.minimum(caps, lam * weights), 0.0)


def _level(
    total: float, weights: FloatArray, caps: FloatArray, ratio: FloatArray, weight_sum: float
) -> float:
    """Lambda: the first level, in ascending (ratio, index) order, that does not cap the next
    account. The running sums are taken in that order, so only a growing prefix of it is
    sorted, and the figures are the ones a full sort gives, bit for bit."""
    n = len(ratio)
    # Every account whose cap is below the plain pro-rata share is capped: the level is further.
    capped = int(np.count_nonzero(ratio < total / weight_sum)) if weight_sum > 0 else n
    size = min(n, capped + 64)
    while True:
        if size < n:
            cut = np.partition(ratio, size - 1)[size - 1]
            head = (ratio <= cut).nonzero()[0]  # ties at the cut too: a prefix of the order
            order = head[np.lexsort((head, ratio[head]))]
        else:
            order = np.argsort(ratio, kind="stable")
        r = ratio[order]
        m = len(order)
        capped_before = np.concatenate(([0.0], np.cumsum(caps[order])[:-1]))
        weight_after = weight_sum - np.concatenate(([0.0], np.cumsum(weights[order])[:-1]))
        level = np.divide(
            total - capped_before, weight_after, out=np.full(m, np.inf), where=weight_after > 0
        )
        fits = (level <= r).nonzero()[0]
        if len(fits):
            return float(level[fits[0]])
        if m >= n:
            return 0.0
        size = min(n, 4 * size)


def priority(shares: FloatArray, tie_rank: IntArray) -> IntArray:
    """Indices by largest share first, ties by `tie_rank` (lower first)."""
    return np.lexsort((tie_rank, -shares)).astype(np.int64)


def first(shares: FloatArray, tie_rank: IntArray, count: int) -> IntArray:
    """The first `count` indices of `priority(shares, tie_rank)`, in no particular order.

    A selection, not a sort: everything above the count-th largest share, then the lowest tie
    ranks among the shares equal to it. `tie_rank` values are distinct.
    """
    n = len(shares)
    if count >= n:
        return np.arange(n, dtype=np.int64)
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    key = -shares
    cut = float(np.partition(key, count - 1)[count - 1])
    if math.isnan(cut):  # NaN shares sort last: let the full sort place them
        return priority(shares, tie_rank)[:count]
    above = (key < cut).nonzero()[0]
    at = (key == cut).nonzero()[0]
    need = count - len(above)
    if need < len(at):
        at = at[np.argsort(tie_rank[at], kind="stable")[:need]]
    out: IntArray = np.concatenate((above, at))
    return out


def round_down(
    shares: FloatArray, caps: IntArray, total: int, tie_rank: IntArray
) -> tuple[IntArray, IntArray]:
    """Whole lots per account and which accounts got a remainder lot (0 or 1 each)."""
    lots = np.minimum(np.floor(shares + _EPS), caps).astype(np.int64)
    extra = np.zeros(len(lots), dtype=np.int64)
    left = total - int(lots.sum())
    if left > 0:
        room = (lots < caps).nonzero()[0]
        extra[room[first(shares[room], tie_rank[room], left)]] = 1
    elif left < 0:  # float noise made the floors overshoot: take back from the smallest shares
        order = priority(shares, tie_rank)[::-1]
        take = order[lots[order] > 0][:-left]
        lots[take] -= 1
    return lots + extra, extra


@dataclass(frozen=True, slots=True)
class Split:
    """The outcome of splitting `total` lots over candidates (arrays are over candidates)."""

    lots: IntArray
    shares: FloatArray
    """Unrounded share of the final split (0 for dropped accounts)."""
    remainder: IntArray
    """1 where the account got a remainder lot."""
    dropped_at: IntArray
    """Candidates dropped below the minimum..."""
    dropped_lots: IntArray
    """... and their rounded shares (lots)."""
    total: int

    @property
    def dropped(self) -> dict[int, int]:
        """Candidate -> its rounded share (lots) when dropped below the minimum."""
        return dict(zip(self.dropped_at.tolist(), self.dropped_lots.tolist(), strict=True))


def split(
    total: int,
    weights: FloatArray,
    caps: IntArray,
    min_lots: int,
    tie_rank: IntArray,
) -> Split:
    """Split `total` lots by `weights` under `caps`, round, hand out the remainder, drop shares
    below `min_lots` and re-split. See the module docstring for the rules."""
    n = len(weights)
    dropped_at: list[IntArray] = []
    dropped_lots: list[IntArray] = []
    caps_f = caps.astype(np.float64)

    # Accounts with no weight cannot have a share.
    alive = ~(weights <= 0)
    if not alive.all():
        dropped_at.append((~alive).nonzero()[0])
        dropped_lots.append(np.zeros(len(dropped_at[-1]), dtype=np.int64))

    # More accounts than minimum orders in the total: keep the ones that can reach it.
    room = total // min_lots if min_lots > 0 else n
    if (n if not dropped_at else int(alive.sum())) > room:
        idx = alive.nonzero()[0]
        full = water_fill(float(total), weights[idx], caps_f[idx])
        kept = np.zeros(len(idx), dtype=bool)
        kept[first(weights[idx], tie_rank[idx], room)] = True
        alive[idx[~kept]] = False
        dropped_at.append(idx[~kept])
        dropped_lots.append(np.floor(full[~kept] + _EPS).astype(np.int64))

    if not dropped_at:  # everyone is still in: the first round needs no picking
        x = water_fill(float(total), weights, caps_f)
        got, rem = round_down(x, caps, total, tie_rank)
        small = got < min_lots
        if not small.any():
            return Split(
                lots=got, shares=x, remainder=rem, dropped_at=_NONE, dropped_lots=_NONE, total=total
            )
        alive[small] = False
        dropped_at.append(small.nonzero()[0])
        dropped_lots.append(got[small])
    lots = np.zeros(n, dtype=np.int64)
    shares = np.zeros(n)
    extra = np.zeros(n, dtype=np.int64)
    while alive.any():
        idx = alive.nonzero()[0]
        x = water_fill(float(total), weights[idx], caps_f[idx])
        got, rem = round_down(x, caps[idx], total, tie_rank[idx])
        small = got < min_lots
        if not small.any():
            lots[idx], shares[idx], extra[idx] = got, x, rem
            break
        alive[idx[small]] = False
        dropped_at.append(idx[small])
        dropped_lots.append(got[small])
    return Split(
        lots=lots,
        shares=shares,
        remainder=extra,
        dropped_at=np.concatenate(dropped_at) if dropped_at else _NONE,
        dropped_lots=np.concatenate(dropped_lots) if dropped_lots else _NONE,
        total=total,
    )
