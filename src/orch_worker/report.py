"""`orch-worker report`: one self-contained HTML page about the signals of a time range.

Everything comes from the audit store, so the page says what the worker actually decided and
what the venue actually did, not what a configuration says should happen. Signals are taken
whole by when they were received (`--since`/`--until` on `signal_received`), so a fill that came
after `--until` still counts for its signal.

Definitions (each number on the page sits in an element with `data-metric` and the keys it
belongs to, so a test can recompute it from the database and compare):

* planned: the plan's allocation per account; released: quantities of `intent_released`;
  filled: the sum of `fill_delta` of `intent_transition` events.
* fill rate: filled / released. Slippage, in basis points of the signal's reference price,
  signed so that positive is worse for the account: (fill - reference) / reference for a buy,
  the negative for a sell, weighted by filled quantity.
* delay: released_at - the plan's time (the stagger); lag: released_at - scheduled_at (how late
  the release was against its schedule).
* rotation: the account of a signal's first initial release (by released_at, then chain order).
  Expected first count = sum over the signals an account was released in of 1 / accounts
  released in that signal. Fair: within 10% of expected, or within one signal (counts are whole
  numbers, so a few signals cannot meet 10% exactly).
* failures: the reason codes of applied `intent_transition`s that carry one, and the codes of
  `intent_expired` releases; exclusions: the code of every reason of every `account_excluded`.
* headroom: per allocation, the account's cap (the most its tightest rule allowed) minus its
  share, and margin / margin available, from the plan's allocation numbers.
* compliance: every release's account is in its plan with quantity <= planned (a reroute may go
  to a planned alternative, up to the largest planned share); no cross-account hedge: within a
  signal set (a portfolio's signals on one symbol whose lifetimes overlap) no account ends with
  a net long fill while another ends net short, unless the portfolio's recorded configuration
  allows hedging across accounts; rotation fairness as above.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from html import escape
from typing import Any

from orch_worker.adapters.db.store import AuditStore
from orch_worker.domain.models import AuditEvent, ResultStatus
from orch_worker.domain.types import format_ts
from orch_worker.svgplot import bar_chart, histogram

TERMINAL_STATUSES = frozenset(s.value for s in ResultStatus if s.terminal)

FAIRNESS_TOLERANCE = 0.10
"""Rotation: first-position counts within this share of expected (or within one) are fair."""

ZERO = Decimal(0)
NAN = float("nan")


def qty(value: Decimal) -> str:
    """A quantity as plain decimal text without trailing zeros (what the tests compare)."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def _dec(value: object) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def _ts(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def code_of(reason: str) -> str:
    """`INSUFFICIENT_MARGIN: needed=...` -> `INSUFFICIENT_MARGIN`."""
    return reason.split(":", 1)[0].strip() or "UNKNOWN"


# -- one signal, read from its events ------------------------------------------------------------


@dataclass(slots=True)
class Release:
    intent_id: str
    account_id: str
    kind: str
    side: str
    quantity: Decimal
    reference: Decimal | None
    scheduled_at: datetime
    released_at: datetime
    parent_intent_id: str | None
    seq: int


@dataclass(slots=True)
class Fill:
    intent_id: str
    account_id: str
    quantity: Decimal
    price: Decimal
    seq: int


@dataclass(slots=True)
class SignalView:
    """What the report needs of one signal, folded from its events in chain order."""

    signal_id: str
    portfolio: str
    received_at: datetime
    symbol: str | None = None
    side: str | None = None
    planned_at: datetime | None = None
    plan: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    status: str | None = None
    ended_at: datetime | None = None
    releases: list[Release] = field(default_factory=list)
    fills: list[Fill] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    exclusions: list[tuple[str, list[str]]] = field(default_factory=list)
    rejected: str | None = None

    @property
    def allocations(self) -> dict[str, Decimal]:
        plan = self.plan or {}
        out: dict[str, Decimal] = {}
        for a in plan.get("allocations", []):
            q = _dec(a.get("quantity"))
            if q is not None:
                out[str(a["account_id"])] = q
        return out


def _on_plan(view: SignalView, e: AuditEvent) -> None:
    view.planned_at = e.ts
    plan = e.data.get("plan")
    view.plan = plan if isinstance(plan, dict) else None
    config = e.data.get("config")
    view.config = config if isinstance(config, dict) else None
    signal = e.data.get("signal")
    if isinstance(signal, dict):
        view.symbol, view.side = signal.get("symbol"), signal.get("side")
    if e.type == "signal_rejected" and view.plan:
        view.rejected = code_of(str(view.plan.get("rejected_reason") or "UNKNOWN"))


def _on_release(view: SignalView, e: AuditEvent) -> None:
    intent = e.data.get("intent")
    if not isinstance(intent, dict):
        return
    q = _dec(intent.get("quantity"))
    scheduled, released = _ts(intent.get("scheduled_at")), _ts(intent.get("released_at"))
    if q is None or scheduled is None or released is None:
        return
    view.releases.append(
        Release(
            intent_id=str(intent.get("intent_id")),
            account_id=str(intent.get("account_id")),
            kind=str(intent.get("kind", "initial")),
            side=str(intent.get("side")),
            quantity=q,
            reference=_dec(intent.get("reference_price") or intent.get("limit_price")),
            scheduled_at=scheduled,
            released_at=released,
            parent_intent_id=intent.get("parent_intent_id"),
            seq=e.seq,
        )
    )


def _on_transition(view: SignalView, e: AuditEvent) -> None:
    delta, price = _dec(e.data.get("fill_delta")), _dec(e.data.get("last_price"))
    if delta is not None and delta > 0 and price is not None:
        view.fills.append(Fill(str(e.intent_id), str(e.account_id), delta, price, e.seq))
    reason = e.data.get("reason_code")
    if isinstance(reason, str) and e.data.get("outcome") == "applied":
        view.failures.append(reason)


def fold(
    signal_id: str, portfolio: str, received_at: datetime, events: Iterable[AuditEvent]
) -> SignalView:
    """Build a `SignalView` from one signal's events (in chain order)."""
    view = SignalView(signal_id, portfolio, received_at)
    for e in events:
        status = e.data.get("signal_status")
        if isinstance(status, str):
            view.status = status
            view.ended_at = e.ts
        match e.type:
            case "plan_created" | "signal_rejected":
                _on_plan(view, e)
            case "intent_released":
                _on_release(view, e)
            case "intent_transition":
                _on_transition(view, e)
            case "intent_expired":
                view.failures.append(code_of(str(e.data.get("reason") or "EXPIRED")))
            case "account_excluded":
                reasons = e.data.get("reasons")
                codes = [code_of(str(r)) for r in reasons] if isinstance(reasons, list) else []
                view.exclusions.append((str(e.account_id), codes))
    if view.status not in TERMINAL_STATUSES:
        view.ended_at = None  # still open: its lifetime runs on
    return view


# -- the numbers ---------------------------------------------------------------------------------


@dataclass(slots=True)
class AccountLine:
    """Per-account totals over the report's signals."""

    planned: Decimal = ZERO
    released: Decimal = ZERO
    filled: Decimal = ZERO
    slip_weighted: Decimal = ZERO
    """Sum of fill quantity x slippage in bps (for the quantity-weighted average)."""
    slip_quantity: Decimal = ZERO
    first: int = 0
    expected_first: float = 0.0
    release_signals: int = 0
    excluded: int = 0
    allocations: int = 0
    headroom_min: Decimal | None = None
    headroom_min_pct: float | None = None
    capped: int = 0
    margin_use_max_pct: float | None = None

    @property
    def fill_rate(self) -> float:
        return float(self.filled / self.released) if self.released else NAN

    @property
    def slippage_bps(self) -> float:
        return float(self.slip_weighted / self.slip_quantity) if self.slip_quantity else NAN

    @property
    def fair(self) -> bool:
        diff = abs(self.first - self.expected_first)
        return diff <= max(FAIRNESS_TOLERANCE * self.expected_first, 1.0) + 1e-9


@dataclass(slots=True)
class Check:
    """One compliance check: how many things it looked at and what failed, in words."""

    name: str
    title: str
    checked: int = 0
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Report:
    since: datetime | None
    until: datetime | None
    generated_at: datetime
    signals: list[SignalView]
    accounts: dict[str, AccountLine]
    statuses: Counter[str]
    failures: Counter[str]
    exclusions: Counter[str]
    rejections: Counter[str]
    delays_s: list[float]
    lags_s: list[float]
    checks: list[Check]

    @property
    def releases(self) -> int:
        return sum(len(s.releases) for s in self.signals)

    @property
    def fills(self) -> int:
        return sum(len(s.fills) for s in self.signals)


def slippage_bps(side: str, price: Decimal, reference: Decimal) -> Decimal:
    """Signed so that positive is worse for the account: paid more on a buy, got less on a sell."""
    sign = 1 if side == "buy" else -1
    return sign * (price - reference) / reference * 10_000


def _quantities(views: Sequence[SignalView], lines: defaultdict[str, AccountLine]) -> None:
    for v in views:
        for account, q in v.allocations.items():
            lines[account].planned += q
        by_intent = {r.intent_id: r for r in v.releases}
        for r in v.releases:
            if r.kind != "cancel":
                lines[r.account_id].released += r.quantity
        for f in v.fills:
            line = lines[f.account_id]
            line.filled += f.quantity
            rel = by_intent.get(f.intent_id)
            if rel is not None and rel.reference:
                line.slip_weighted += f.quantity * slippage_bps(rel.side, f.price, rel.reference)
                line.slip_quantity += f.quantity
        for account, _ in v.exclusions:
            lines[account].excluded += 1


def release_order(view: SignalView) -> list[Release]:
    """The signal's initial releases in the order they went out."""
    initial = [r for r in view.releases if r.kind == "initial"]
    return sorted(initial, key=lambda r: (r.released_at, r.seq))


def _rotation(views: Sequence[SignalView], lines: defaultdict[str, AccountLine]) -> None:
    for v in views:
        order = release_order(v)
        if not order:
            continue
        lines[order[0].account_id].first += 1
        accounts = {r.account_id for r in order}
        for a in accounts:
            lines[a].release_signals += 1
            lines[a].expected_first += 1 / len(accounts)


def _headroom(views: Sequence[SignalView], lines: defaultdict[str, AccountLine]) -> None:
    for v in views:
        for a in (v.plan or {}).get("allocations", []):
            line = lines[str(a["account_id"])]
            numbers = a.get("numbers") or {}
            line.allocations += 1
            cap, share = _dec(numbers.get("cap")), _dec(a.get("quantity"))
            if cap is not None and share is not None:
                room = cap - share
                if line.headroom_min is None or room < line.headroom_min:
                    line.headroom_min = room
                pct = float(room / cap * 100) if cap else 0.0
                if line.headroom_min_pct is None or pct < line.headroom_min_pct:
                    line.headroom_min_pct = pct
            if numbers.get("capped_by"):
                line.capped += 1
            margin, available = _dec(numbers.get("margin")), _dec(numbers.get("margin_available"))
            if margin is not None and available is not None and available > 0:
                use = float(margin / available * 100)
                if line.margin_use_max_pct is None or use > line.margin_use_max_pct:
                    line.margin_use_max_pct = use


def check_releases(views: Sequence[SignalView]) -> Check:
    """Every release went to an account of its plan, for no more than the plan gave it."""
    check = Check("releases_within_plan", "Every release inside its account's planned share")
    for v in views:
        planned = v.allocations
        alternatives = set((v.plan or {}).get("alternatives", []))
        largest = max(planned.values(), default=ZERO)
        for r in v.releases:
            if r.kind == "cancel":
                continue
            check.checked += 1
            where = f"{v.signal_id} {r.intent_id} ({r.account_id}, {r.kind})"
            if r.kind == "reroute":
                if r.account_id not in planned and r.account_id not in alternatives:
                    check.violations.append(f"{where}: account neither planned nor alternative")
                elif r.quantity > largest:
                    check.violations.append(
                        f"{where}: {qty(r.quantity)} above the largest planned share {qty(largest)}"
                    )
            elif r.account_id not in planned:
                check.violations.append(f"{where}: account not in the plan")
            elif r.quantity > planned[r.account_id]:
                check.violations.append(
                    f"{where}: {qty(r.quantity)} above the planned {qty(planned[r.account_id])}"
                )
    return check


def signal_sets(views: Sequence[SignalView]) -> list[list[SignalView]]:
    """Signals of one portfolio and symbol whose lifetimes overlap, grouped (by start time)."""
    by_key: defaultdict[tuple[str, str], list[SignalView]] = defaultdict(list)
    for v in views:
        if v.symbol is not None and v.fills:
            by_key[(v.portfolio, v.symbol)].append(v)
    sets: list[list[SignalView]] = []
    for key in sorted(by_key):
        group: list[SignalView] = []
        group_end: datetime | None = None
        for v in sorted(by_key[key], key=lambda x: (x.received_at, x.signal_id)):
            end = v.ended_at or datetime.max.replace(tzinfo=UTC)
            if group and group_end is not None and v.received_at > group_end:
                sets.append(group)
                group, group_end = [], None
            group.append(v)
            group_end = end if group_end is None else max(group_end, end)
        if group:
            sets.append(group)
    return sets


def _hedging_allowed(view: SignalView) -> bool:
    portfolios = (view.config or {}).get("portfolios", {})
    return bool(portfolios.get(view.portfolio, {}).get("cross_account_hedging_allowed", False))


def check_hedges(views: Sequence[SignalView]) -> Check:
    """No two accounts of a portfolio end a signal set on opposite sides of the same symbol."""
    check = Check("no_cross_account_hedge", "No cross-account hedge within a signal set")
    for group in signal_sets(views):
        check.checked += 1
        net: defaultdict[str, Decimal] = defaultdict(Decimal)
        for v in group:
            sign = 1 if v.side == "buy" else -1
            for f in v.fills:
                net[f.account_id] += sign * f.quantity
        longs = sorted(a for a, q in net.items() if q > 0)
        shorts = sorted(a for a, q in net.items() if q < 0)
        if longs and shorts:
            ids = ", ".join(v.signal_id for v in group)
            what = (
                f"{group[0].portfolio} {group[0].symbol} (signals {ids}): net long "
                f"{', '.join(longs)} while net short {', '.join(shorts)}"
            )
            if all(_hedging_allowed(v) for v in group):
                check.notes.append(f"{what}; allowed by cross_account_hedging_allowed")
            else:
                check.violations.append(what)
    return check


def check_rotation(lines: dict[str, AccountLine]) -> Check:
    check = Check("rotation_fairness", "Rotation fairness (who goes first)")
    for account, line in sorted(lines.items()):
        if not line.release_signals:
            continue
        check.checked += 1
        if not line.fair:
            check.violations.append(
                f"{account}: first {line.first} times, expected {line.expected_first:.2f} "
                f"(over {line.release_signals} signals)"
            )
    return check


def _delays(views: Sequence[SignalView]) -> tuple[list[float], list[float]]:
    delays: list[float] = []
    lags: list[float] = []
    for v in views:
        for r in v.releases:
            if r.kind == "cancel":
                continue
            lags.append((r.released_at - r.scheduled_at).total_seconds())
            if v.planned_at is not None:
                delays.append((r.released_at - v.planned_at).total_seconds())
    return delays, lags


def build(
    views: Sequence[SignalView],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    generated_at: datetime | None = None,
) -> Report:
    """Every number of the report from the folded signals (pure: no store, no clock)."""
    lines: defaultdict[str, AccountLine] = defaultdict(AccountLine)
    _quantities(views, lines)
    _rotation(views, lines)
    _headroom(views, lines)
    delays, lags = _delays(views)
    accounts = dict(sorted(lines.items()))
    return Report(
        since=since,
        until=until,
        generated_at=generated_at or datetime.now(UTC),
        signals=list(views),
        accounts=accounts,
        statuses=Counter(v.status or "unknown" for v in views),
        failures=Counter(c for v in views for c in v.failures),
        exclusions=Counter(c for v in views for _, codes in v.exclusions for c in codes),
        rejections=Counter(v.rejected for v in views if v.rejected),
        delays_s=delays,
        lags_s=lags,
        checks=[check_releases(views), check_hedges(views), check_rotation(accounts)],
    )


def collect(
    store: AuditStore, since: datetime | None = None, until: datetime | None = None
) -> list[SignalView]:
    """The report's signals (received in [since, until)) with all their events."""
    received = store.received_signals(since, until)
    events: defaultdict[str, list[AuditEvent]] = defaultdict(list)
    for e in store.signal_events([r.signal_id for r in received]):
        if e.signal_id is not None:
            events[e.signal_id].append(e)
    return [fold(r.signal_id, r.portfolio, r.received_ts, events[r.signal_id]) for r in received]


# -- the page ------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Liberation Sans",sans-serif;
margin:0;color:#1d2733;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid
#d5dae1;padding-bottom:4px}h3{font-size:14px;margin:16px 0 6px;color:#3d4a5c}
p.meta{color:#5b6878;margin:0 0 16px;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{background:#fff;border:1px solid #d5dae1;
border-radius:6px;padding:10px 16px;min-width:120px}.card b{display:block;font-size:22px}
.card span{font-size:12px;color:#5b6878}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:6px 0 12px}
th,td{border:1px solid #d5dae1;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#eef1f5}
.row{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
figure.chart{margin:6px 0 12px}figure.chart figcaption{font-size:13px;font-weight:600;
color:#3d4a5c;margin:0 0 4px}figure.chart svg{background:#fff;border:1px solid #d5dae1;
border-radius:4px;display:block}
svg .label,svg .value,svg .legend{font-size:11px;fill:#1d2733}svg .axis{stroke:#8a96a3}
.pass{color:#1e7b3a;font-weight:600}.flag{color:#b3261e;font-weight:600}
ul.findings{font-size:13px;margin:4px 0 12px}p.empty{color:#5b6878;font-style:italic}
.check{background:#fff;border:1px solid #d5dae1;border-radius:6px;padding:8px 16px;margin:8px 0}
"""


def _f(value: float | None, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _td(value: str, metric: str, **keys: str) -> str:
    attrs = f' data-metric="{escape(metric)}"' + "".join(
        f' data-{k}="{escape(v)}"' for k, v in keys.items()
    )
    return f"<td{attrs}>{escape(value)}</td>"


def _table(head: Sequence[str], rows: Sequence[str]) -> str:
    if not rows:
        return '<p class="empty">none</p>'
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _counts(title: str, metric: str, key: str, counts: Counter[str]) -> str:
    if not counts:
        return '<p class="empty">none recorded</p>'
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    rows = [f"<tr><td>{escape(k)}</td>{_td(str(n), metric, **{key: k})}</tr>" for k, n in items]
    chart = bar_chart(title, [k for k, _ in items], [("count", [float(n) for _, n in items])])
    return f'<div class="row"><div>{_table([key, "count"], rows)}</div>{chart}</div>'


def _summary(r: Report) -> str:
    cards = [
        ("signals", str(len(r.signals)), "signals"),
        ("releases", str(r.releases), "releases"),
        ("fills", str(r.fills), "fills"),
        ("accounts", str(len(r.accounts)), "accounts"),
    ]
    html = ['<div class="cards">']
    html += [
        f'<div class="card"><b data-metric="{m}">{v}</b><span>{escape(label)}</span></div>'
        for m, v, label in cards
    ]
    html.append("</div><h3>Signals by final status</h3>")
    rows = [
        f"<tr><td>{escape(s)}</td>{_td(str(n), 'signal_status', status=s)}</tr>"
        for s, n in sorted(r.statuses.items())
    ]
    html.append(_table(["status", "signals"], rows))
    return "".join(html)


def _quantity_section(r: Report) -> str:
    rows = [
        "<tr>"
        f"<td>{escape(a)}</td>"
        + _td(qty(x.planned), "planned", account=a)
        + _td(qty(x.released), "released", account=a)
        + _td(qty(x.filled), "filled", account=a)
        + "</tr>"
        for a, x in r.accounts.items()
    ]
    labels = list(r.accounts)
    chart = bar_chart(
        "Quantity per account",
        labels,
        [
            ("planned", [float(x.planned) for x in r.accounts.values()]),
            ("released", [float(x.released) for x in r.accounts.values()]),
            ("filled", [float(x.filled) for x in r.accounts.values()]),
        ],
    )
    table = _table(["account", "planned", "released", "filled"], rows)
    return f'<div class="row"><div>{table}</div>{chart}</div>'


def _stats(values: Sequence[float], metric: str) -> list[str]:
    if not values:
        return [_td("0", f"{metric}_count")] + ["<td>n/a</td>"] * 4
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return [
        _td(str(len(values)), f"{metric}_count"),
        _td(f"{statistics.fmean(values):.3f}", f"{metric}_mean_s"),
        _td(f"{statistics.median(values):.3f}", f"{metric}_p50_s"),
        _td(f"{p90:.3f}", f"{metric}_p90_s"),
        _td(f"{ordered[-1]:.3f}", f"{metric}_max_s"),
    ]


def _timing_section(r: Report) -> str:
    head = ["", "releases", "mean s", "p50 s", "p90 s", "max s"]
    rows = [
        "<tr><td>delay after the plan (released_at - plan time)</td>"
        + "".join(_stats(r.delays_s, "delay"))
        + "</tr>",
        "<tr><td>lag behind schedule (released_at - scheduled_at)</td>"
        + "".join(_stats(r.lags_s, "lag"))
        + "</tr>",
    ]
    rot_rows = [
        "<tr>"
        f"<td>{escape(a)}</td>"
        + _td(str(x.first), "first", account=a)
        + _td(f"{x.expected_first:.2f}", "expected_first", account=a)
        + _td(str(x.release_signals), "release_signals", account=a)
        + f'<td class="{"pass" if x.fair else "flag"}">{"fair" if x.fair else "FLAGGED"}</td>'
        + "</tr>"
        for a, x in r.accounts.items()
        if x.release_signals
    ]
    rotated = [(a, x) for a, x in r.accounts.items() if x.release_signals]
    chart = bar_chart(
        "First in the release order",
        [a for a, _ in rotated],
        [
            ("first", [float(x.first) for _, x in rotated]),
            ("expected", [x.expected_first for _, x in rotated]),
        ],
    )
    return (
        _table(head, rows)
        + histogram("Release delay after the plan", r.delays_s, unit=" s")
        + "<h3>Rotation: how often each account went first</h3>"
        + '<div class="row"><div>'
        + _table(["account", "first", "expected", "signals", "verdict"], rot_rows)
        + f"</div>{chart}</div>"
    )


def _fills_section(r: Report) -> str:
    rows = [
        "<tr>"
        f"<td>{escape(a)}</td><td>{qty(x.released)}</td><td>{qty(x.filled)}</td>"
        + _td(_f(x.fill_rate, 4), "fill_rate", account=a)
        + _td(_f(x.slippage_bps, 2), "slippage_bps", account=a)
        + "</tr>"
        for a, x in r.accounts.items()
        if x.released
    ]
    shown = [(a, x) for a, x in r.accounts.items() if x.released]
    rates = bar_chart(
        "Fill rate per account",
        [a for a, _ in shown],
        [("fill rate", [x.fill_rate for _, x in shown])],
    )
    slips = bar_chart(
        "Slippage per account (bps, positive = worse)",
        [a for a, _ in shown],
        [("slippage", [x.slippage_bps for _, x in shown])],
        unit=" bps",
    )
    table = _table(["account", "released", "filled", "fill rate", "slippage bps"], rows)
    return f'{table}<div class="row">{rates}{slips}</div>'


def _excluded_accounts(r: Report) -> str:
    shown = [(a, x) for a, x in r.accounts.items() if x.excluded]
    rows = [
        f"<tr><td>{escape(a)}</td>{_td(str(x.excluded), 'excluded', account=a)}</tr>"
        for a, x in shown
    ]
    return "<h3>Signals each account was left out of</h3>" + _table(["account", "signals"], rows)


def _headroom_section(r: Report) -> str:
    shown = [(a, x) for a, x in r.accounts.items() if x.allocations]
    rows = [
        "<tr>"
        f"<td>{escape(a)}</td>"
        + _td(str(x.allocations), "allocations", account=a)
        + _td(
            qty(x.headroom_min) if x.headroom_min is not None else "n/a",
            "headroom_min",
            account=a,
        )
        + _td(_f(x.headroom_min_pct, 1), "headroom_min_pct", account=a)
        + _td(str(x.capped), "capped", account=a)
        + _td(_f(x.margin_use_max_pct, 2), "margin_use_max_pct", account=a)
        + "</tr>"
        for a, x in shown
    ]
    chart = bar_chart(
        "Smallest headroom left under the tightest rule (% of cap)",
        [a for a, _ in shown],
        [
            (
                "headroom %",
                [x.headroom_min_pct if x.headroom_min_pct is not None else NAN for _, x in shown],
            )
        ],
        unit="%",
    )
    head = [
        "account",
        "allocations",
        "min headroom (qty)",
        "min headroom %",
        "capped by a rule",
        "max margin use %",
    ]
    return f"{_table(head, rows)}{chart}"


def _compliance_section(r: Report) -> str:
    out = []
    for c in r.checks:
        ok = not c.violations
        verdict = (
            '<span class="pass">PASS</span>'
            if ok
            else f'<span class="flag">FLAGGED: {len(c.violations)}</span>'
        )
        out.append(
            f'<div class="check" data-check="{c.name}" data-checked="{c.checked}" '
            f'data-violations="{len(c.violations)}"><h3>{escape(c.title)}: {verdict}</h3>'
            f"<p>{c.checked} checked.</p>"
        )
        if c.violations:
            out.append('<ul class="findings">')
            out += [f"<li>{escape(v)}</li>" for v in c.violations[:200]]
            if len(c.violations) > 200:
                out.append(f"<li>... and {len(c.violations) - 200} more</li>")
            out.append("</ul>")
        if c.notes:
            out.append('<ul class="findings">')
            out += [f"<li>{escape(n)}</li>" for n in c.notes[:200]]
            out.append("</ul>")
        out.append("</div>")
    return "".join(out)


def render(r: Report) -> str:
    """The whole page: inline CSS and SVG only, no script, no external resource."""
    span = (
        f"signals received from {format_ts(r.since) if r.since else 'the beginning'} "
        f"until {format_ts(r.until) if r.until else 'now'}"
    )
    sections = [
        ("Summary", _summary(r)),
        ("Quantity per account", _quantity_section(r)),
        ("Release timing and rotation", _timing_section(r)),
        ("Fill rates and slippage", _fills_section(r)),
        (
            "Failures by reason code",
            _counts("Failures by reason code", "failures", "reason", r.failures),
        ),
        (
            "Exclusions by reason code",
            _counts("Exclusions by reason code", "exclusions", "reason", r.exclusions)
            + _excluded_accounts(r),
        ),
        (
            "Signal rejections by reason code",
            _counts("Signal rejections", "rejections", "reason", r.rejections),
        ),
        ("Rule headroom per account", _headroom_section(r)),
        ("Compliance", _compliance_section(r)),
    ]
    body = "".join(f"<section><h2>{escape(t)}</h2>{html}</section>" for t, html in sections)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>orch-worker audit report</title>"
        f"<style>{CSS}</style></head><body><main>"
        "<h1>orch-worker audit report</h1>"
        f'<p class="meta">{escape(span)}; generated {format_ts(r.generated_at)} from the audit '
        "store. Definitions of every number are in <code>orch_worker/report.py</code>.</p>"
        f"{body}</main></body></html>"
    )


def report_html(
    store: AuditStore,
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    generated_at: datetime | None = None,
) -> tuple[str, Report]:
    """The report page for the signals received in [since, until), and its numbers."""
    data = build(collect(store, since, until), since=since, until=until, generated_at=generated_at)
    return render(data), data
