"""Correlation between instruments, and how much correlated risk a trade adds (AC2).

Definitions used by the planner, written once here:

* **Open risk of a position** = |quantity| x value_per_unit x avg_price x risk_proxy_pct / 100.
  Account states carry no stop for an open position, so its risk is proxied as a configured
  share of its notional (`instruments.X.risk_proxy_pct`, 1% by default).
* **Direction-adjusted correlation** of a held position j with a new order on symbol i and side
  s: rho(i, j) x sign(quantity_j) x sign(s). Positive means the position is the same bet (long
  a correlated symbol, or short an anti-correlated one).
* **Correlated open risk** of an account = sum over its positions of
  max(0, direction-adjusted correlation) x open risk. A same-symbol, same-direction position
  counts in full (rho = 1).
* **Correlated exposure** of an account after the order = the order's stop-loss risk + its
  correlated open risk; `rules.max_correlated_risk_pct` caps it as a share of equity.
* **Cluster** of the signal = the positions, across the portfolio, whose direction-adjusted
  correlation is at least `correlation_cluster_threshold`. `max_cluster_risk_share` caps
  (cluster risk + new risk) / max(portfolio open risk + new risk, floor), where the floor is
  `cluster_risk_floor_pct` of the portfolio's equity, so a flat portfolio's first trade is not
  "100% concentrated".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from orch_worker.domain.config import OrchConfig

FloatArray = npt.NDArray[np.float64]


class CorrelationError(ValueError):
    """A matrix that is not a correlation matrix, or prices that cannot give one."""


@dataclass(frozen=True, slots=True, eq=False)
class CorrelationMatrix:
    """A symmetric matrix with a unit diagonal and entries in [-1, 1], indexed by symbol."""

    symbols: tuple[str, ...]
    matrix: FloatArray
    _hash: int = field(init=False, repr=False, compare=False, default=0)
    """Computed once: the planner keys its memoised columns by the matrix."""

    def __post_init__(self) -> None:
        m = self.matrix
        n = len(self.symbols)
        if m.shape != (n, n):
            raise CorrelationError(f"matrix is {m.shape}, expected {(n, n)}")
        if not np.all(np.isfinite(m)):
            raise CorrelationError("matrix has non-finite entries")
        if not np.allclose(m, m.T, atol=1e-12):
            raise CorrelationError("matrix is not symmetric")
        if not np.allclose(np.diag(m), 1.0, atol=1e-12):
            raise CorrelationError("diagonal is not 1")
        if np.any(np.abs(m) > 1.0 + 1e-12):
            raise CorrelationError("entries outside [-1, 1]")
        m.setflags(write=False)
        object.__setattr__(self, "_hash", hash((self.symbols, m.tobytes())))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CorrelationMatrix):
            return NotImplemented
        if self is other:
            return True
        return self.symbols == other.symbols and bool(np.array_equal(self.matrix, other.matrix))

    def __hash__(self) -> int:
        return self._hash

    def get(self, a: str, b: str) -> float:
        """Correlation of two symbols; 1 for a symbol with itself, 0 for unknown pairs."""
        if a == b:
            return 1.0
        try:
            return float(self.matrix[self.symbols.index(a), self.symbols.index(b)])
        except ValueError:
            return 0.0

    def row(self, symbol: str, symbols: Sequence[str]) -> FloatArray:
        """Correlations of `symbol` with each of `symbols` (in that order)."""
        return np.array([self.get(symbol, s) for s in symbols], dtype=np.float64)

    @classmethod
    def identity(cls, symbols: Sequence[str]) -> CorrelationMatrix:
        return cls(tuple(symbols), np.eye(len(symbols)))

    @classmethod
    def from_pairs(cls, symbols: Sequence[str], pairs: Mapping[str, float]) -> CorrelationMatrix:
        """From `{"A/B": rho}`; pairs not given are 0, the diagonal is 1."""
        syms = tuple(symbols)
        m = np.eye(len(syms))
        pos = {s: i for i, s in enumerate(syms)}
        for key, rho in pairs.items():
            a, _, b = (p.strip() for p in key.partition("/"))
            if a not in pos or b not in pos:
                raise CorrelationError(f"{key}: unknown symbol")
            if a == b:
                if rho != 1.0:
                    raise CorrelationError(f"{key}: a symbol's correlation with itself is 1")
                continue
            if m[pos[a], pos[b]] not in (0.0, rho):
                raise CorrelationError(f"{key}: contradicts the reverse pair")
            m[pos[a], pos[b]] = m[pos[b], pos[a]] = rho
        return cls(syms, m)

    @classmethod
    def from_config(cls, config: OrchConfig) -> CorrelationMatrix:
        return cls.from_pairs(sorted(config.instruments), config.correlations)

    @classmethod
    def from_prices(cls, symbols: Sequence[str], prices: npt.ArrayLike) -> CorrelationMatrix:
        """Pearson correlation of log returns over a window of prices.

        Args:
            symbols: the column names.
            prices: shape (observations, symbols), positive, oldest first, at least 3 rows.

        A symbol whose price never moves has no defined correlation; it gets 0 with the others.
        """
        p = np.asarray(prices, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != len(symbols):
            raise CorrelationError(f"prices are {p.shape}, expected (n, {len(symbols)})")
        if p.shape[0] < 3:
            raise CorrelationError("need at least 3 prices per symbol")
        if not np.all(np.isfinite(p)) or np.any(p <= 0):
            raise CorrelationError("prices must be finite and positive")
        r = np.diff(np.log(p), axis=0)
        r = r - r.mean(axis=0)
        norm = np.sqrt((r * r).sum(axis=0))
        flat = norm == 0
        norm[flat] = 1.0
        z = r / norm
        m = np.clip(z.T @ z, -1.0, 1.0)
        m[flat, :] = 0.0
        m[:, flat] = 0.0
        m = (m + m.T) / 2
        np.fill_diagonal(m, 1.0)
        return cls(tuple(symbols), m)


def position_risk(
    qty: FloatArray, avg: FloatArray, value_per_unit: FloatArray, proxy_pct: FloatArray
) -> FloatArray:
    """Open risk per (account, symbol): |qty| x value_per_unit x avg_price x proxy % / 100."""
    risk: FloatArray = np.abs(qty) * avg * (value_per_unit * proxy_pct / 100.0)
    return risk


def split_by_direction(qty: FloatArray, risk: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Open risk of long positions and of short positions, separately (same shape as `risk`)."""
    return np.where(qty > 0, risk, 0.0), np.where(qty < 0, risk, 0.0)


def direction_coefficients(rho_row: FloatArray, side_sign: int) -> tuple[FloatArray, FloatArray]:
    """Direction-adjusted correlation with the new order of a long and of a short position in
    each symbol: rho x sign(order), and its negative."""
    same = rho_row * side_sign
    return same, -same


def correlated_open_risk(
    long_risk: FloatArray, short_risk: FloatArray, rho_row: FloatArray, side_sign: int
) -> FloatArray:
    """Per account: sum over positions of max(0, direction-adjusted correlation) x open risk."""
    on_long, on_short = direction_coefficients(rho_row, side_sign)
    out: FloatArray = long_risk @ np.clip(on_long, 0.0, None) + short_risk @ np.clip(
        on_short, 0.0, None
    )
    return out


@dataclass(frozen=True, slots=True)
class ClusterLimit:
    """The most new risk the portfolio's cluster cap lets this signal add, and why."""

    cluster_risk: float
    total_risk: float
    floor: float
    cap: float
    max_new_risk: float

    def share(self, new_risk: float) -> float:
        denom = max(self.total_risk + new_risk, self.floor)
        return (self.cluster_risk + new_risk) / denom if denom > 0 else 0.0


def cluster_limit(
    long_totals: FloatArray,
    short_totals: FloatArray,
    *,
    rho_row: FloatArray,
    side_sign: int,
    threshold: float,
    cap: float,
    portfolio_equity: float,
    floor_pct: float,
) -> ClusterLimit:
    """Largest new risk N with (C + N) / max(T + N, F) <= cap.

    `long_totals` and `short_totals` are the portfolio's open risk per symbol. The share grows
    with N (the cluster is part of the total), so the bound is where it equals the cap: in the
    floor regime N = cap x F - C, otherwise N = (cap x T - C) / (1 - cap).
    """
    on_long, on_short = direction_coefficients(rho_row, side_sign)
    cluster = float(long_totals[on_long >= threshold].sum())
    cluster += float(short_totals[on_short >= threshold].sum())
    total = float(long_totals.sum() + short_totals.sum())
    floor = max(portfolio_equity, 0.0) * floor_pct / 100.0
    if cap >= 1.0:
        best = float("inf")
    else:
        n1 = cap * floor - cluster
        best = n1 if total + n1 <= floor else (cap * total - cluster) / (1.0 - cap)
    return ClusterLimit(cluster, total, floor, cap, max(best, 0.0))
