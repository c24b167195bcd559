"""The paper venue's fill model: deterministic, internally consistent, and honest about prices."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orch_worker.domain.config import VenueConfig
from orch_worker.domain.models import (
    ExecutionReport,
    IntentKind,
    OrderIntent,
    OrderType,
    ReasonCode,
    ReportStatus,
    TimeInForce,
)
from orch_worker.venue.fill_model import (
    TERMINAL_STATUSES,
    ScheduledReport,
    order_id,
    simulate,
)

NOW = datetime(2024, 3, 4, 12, 0, 0, tzinfo=UTC)


def make_intent(intent_id: str = "I-1", **overrides: Any) -> OrderIntent:
    fields: dict[str, Any] = {
        "intent_id": intent_id,
        "plan_id": "P-1",
        "signal_id": "S-1",
        "portfolio": "demo",
        "account_id": "ACC-1",
        "broker": "paper",
        "symbol": "EURUSD",
        "side": "buy",
        "order_type": "market",
        "quantity": "1.25",
        "reference_price": "1.08456",
        "scheduled_at": NOW,
        "released_at": NOW,
        "rationale": "test",
    }
    fields.update(overrides)
    return OrderIntent.model_validate(fields)


def venue(**overrides: Any) -> VenueConfig:
    fields: dict[str, Any] = {"partial_fill_probability": 0.0, "reject_probability": {}}
    fields.update(overrides)
    return VenueConfig.model_validate(fields)


def statuses(scheduled: tuple[ScheduledReport, ...]) -> list[ReportStatus]:
    return [s.report.status for s in scheduled]


def assert_consistent(intent: OrderIntent, scheduled: tuple[ScheduledReport, ...]) -> None:
    """The invariants every report sequence for a non-cancel intent must keep."""
    filled = Decimal(0)
    notional = Decimal(0)
    previous_delay = 0.0
    for item in scheduled:
        r = item.report
        assert r.intent_id == intent.intent_id
        assert r.account_id == intent.account_id
        assert item.delay_s >= previous_delay
        previous_delay = item.delay_s
        assert r.venue_time == NOW + timedelta(seconds=item.delay_s)
        filled += r.last_quantity
        if r.last_quantity:
            assert r.last_price is not None
            notional += r.last_quantity * r.last_price
        assert r.filled_quantity == filled
        assert r.filled_quantity <= intent.quantity
        if r.status in (ReportStatus.ACCEPTED, ReportStatus.PARTIALLY_FILLED):
            assert r.leaves_quantity == intent.quantity - filled
        else:
            assert r.leaves_quantity == 0
        if filled == 0:
            assert r.avg_price is None
        else:
            assert r.avg_price is not None
            assert abs(r.avg_price - notional / filled) <= Decimal("1e-6") * r.avg_price
    assert len({s.report.report_id for s in scheduled}) == len(scheduled)
    assert len({s.report.order_id for s in scheduled}) == 1


def test_same_seed_and_intent_give_identical_reports() -> None:
    cfg = venue(seed=7, partial_fill_probability=0.5, reject_probability={"timeout": 0.2})
    for i in range(50):
        intent = make_intent(f"I-{i}")
        assert simulate(intent, cfg, NOW) == simulate(intent, cfg, NOW)


def test_different_seeds_give_different_reports() -> None:
    intents = [make_intent(f"I-{i}") for i in range(20)]
    a = [simulate(i, venue(seed=1), NOW) for i in intents]
    b = [simulate(i, venue(seed=2), NOW) for i in intents]
    differing = sum(x != y for x, y in zip(a, b, strict=True))
    assert differing == len(intents)
    # Ids name the intent, not the run: the orchestrator dedupes reports by them.
    assert [r.report.report_id for r in a[0]] == [r.report.report_id for r in b[0]]


def test_different_intents_draw_different_latencies() -> None:
    delays = {simulate(make_intent(f"I-{i}"), venue(), NOW)[0].delay_s for i in range(50)}
    assert len(delays) > 45


def test_filled_market_order_accepted_then_filled() -> None:
    intent = make_intent()
    scheduled = simulate(intent, venue(latency_ms_min=5, latency_ms_max=50), NOW)
    assert statuses(scheduled) == [ReportStatus.ACCEPTED, ReportStatus.FILLED]
    assert 0.005 <= scheduled[0].delay_s <= 0.05
    assert 0.01 <= scheduled[1].delay_s <= 0.1
    last = scheduled[-1].report
    assert last.filled_quantity == last.last_quantity == Decimal("1.25")
    assert last.avg_price == last.last_price
    assert_consistent(intent, scheduled)


@pytest.mark.parametrize("code", list(ReasonCode))
def test_every_reject_reason_is_reachable(code: ReasonCode) -> None:
    intent = make_intent()
    scheduled = simulate(intent, venue(reject_probability={code.value: 1.0}), NOW)
    assert statuses(scheduled) == [ReportStatus.ACCEPTED, ReportStatus.REJECTED]
    rejected = scheduled[-1].report
    assert rejected.reason_code is code
    assert rejected.reason_text is not None
    assert rejected.reason_text.startswith("Simulated by the paper venue: ")
    assert rejected.reason_text.endswith(".")
    assert "EURUSD" in rejected.reason_text or "ACC-1" in rejected.reason_text
    assert rejected.filled_quantity == 0
    assert rejected.leaves_quantity == 0
    assert_consistent(intent, scheduled)


def test_reject_texts_differ_by_reason() -> None:
    texts = {
        simulate(make_intent(), venue(reject_probability={c.value: 1.0}), NOW)[
            -1
        ].report.reason_text
        for c in ReasonCode
    }
    assert len(texts) == len(ReasonCode)


def test_reject_reasons_follow_their_probabilities() -> None:
    cfg = venue(reject_probability={"insufficient_margin": 0.3, "timeout": 0.2})
    outcomes: Counter[ReasonCode | None] = Counter(
        simulate(make_intent(f"I-{i}"), cfg, NOW)[-1].report.reason_code for i in range(2000)
    )
    assert set(outcomes) == {ReasonCode.INSUFFICIENT_MARGIN, ReasonCode.TIMEOUT, None}
    assert 0.25 < outcomes[ReasonCode.INSUFFICIENT_MARGIN] / 2000 < 0.35
    assert 0.15 < outcomes[ReasonCode.TIMEOUT] / 2000 < 0.25


def test_market_partial_fill_then_completion_is_consistent() -> None:
    cfg = venue(partial_fill_probability=1.0, partial_fill_min_share=0.3)
    for i in range(200):
        intent = make_intent(f"I-{i}", quantity="1.25")
        scheduled = simulate(intent, cfg, NOW)
        assert statuses(scheduled) == [
            ReportStatus.ACCEPTED,
            ReportStatus.PARTIALLY_FILLED,
            ReportStatus.FILLED,
        ]
        partial = scheduled[1].report
        # At least the minimum share (less one step of rounding down), in steps of 0.01.
        assert Decimal("0.37") <= partial.last_quantity < Decimal("1.25")
        assert partial.last_quantity == partial.last_quantity.quantize(Decimal("0.01"))
        assert scheduled[-1].report.filled_quantity == Decimal("1.25")
        assert_consistent(intent, scheduled)


def test_partial_that_rounds_to_nothing_just_fills() -> None:
    cfg = venue(partial_fill_probability=1.0, partial_fill_min_share=0.3)
    for i in range(50):
        # quantity 1 has step 1: any share below 1 rounds down to 0 -> one complete fill
        scheduled = simulate(make_intent(f"I-{i}", quantity="1"), cfg, NOW)
        assert statuses(scheduled) == [ReportStatus.ACCEPTED, ReportStatus.FILLED]
        assert scheduled[-1].report.filled_quantity == 1


def test_limit_partial_stays_open_at_the_limit_price() -> None:
    cfg = venue(partial_fill_probability=1.0)
    intent = make_intent(order_type="limit", limit_price="1.08", quantity="2.00")
    scheduled = simulate(intent, cfg, NOW)
    assert statuses(scheduled) == [ReportStatus.ACCEPTED, ReportStatus.PARTIALLY_FILLED]
    last = scheduled[-1].report
    assert last.last_price == Decimal("1.08")
    assert last.avg_price == Decimal("1.08")
    assert 0 < last.filled_quantity < Decimal(2)
    assert last.leaves_quantity == Decimal(2) - last.filled_quantity
    assert_consistent(intent, scheduled)


def test_limit_without_partial_fills_at_the_limit() -> None:
    intent = make_intent(order_type="limit", limit_price="1.07", side="sell")
    scheduled = simulate(intent, venue(), NOW)
    assert statuses(scheduled) == [ReportStatus.ACCEPTED, ReportStatus.FILLED]
    assert scheduled[-1].report.last_price == Decimal("1.07")


def test_ioc_limit_partial_cancels_the_rest_and_fok_never_partially_fills() -> None:
    cfg = venue(partial_fill_probability=1.0)
    ioc = make_intent(order_type="limit", limit_price="1.08", time_in_force="ioc")
    scheduled = simulate(ioc, cfg, NOW)
    assert statuses(scheduled) == [
        ReportStatus.ACCEPTED,
        ReportStatus.PARTIALLY_FILLED,
        ReportStatus.CANCELLED,
    ]
    assert scheduled[-1].report.filled_quantity == scheduled[1].report.filled_quantity
    assert_consistent(ioc, scheduled)
    fok = make_intent(order_type="limit", limit_price="1.08", time_in_force=TimeInForce.FOK)
    assert statuses(simulate(fok, cfg, NOW)) == [ReportStatus.ACCEPTED, ReportStatus.FILLED]


def test_buy_slippage_never_below_reference_and_sell_never_above() -> None:
    cfg = venue(slippage_bps_max=Decimal(5), partial_fill_probability=0.5)
    reference = Decimal("1.08456")
    worst_buy = reference * (1 + Decimal(5) / 10_000)
    buy_prices: set[Decimal] = set()
    for i in range(300):
        for side in ("buy", "sell"):
            scheduled = simulate(make_intent(f"I-{i}", side=side), cfg, NOW)
            for item in scheduled:
                price = item.report.last_price
                if price is None:
                    continue
                if side == "buy":
                    buy_prices.add(price)
                    assert reference <= price <= worst_buy + Decimal("0.0000001")
                else:
                    assert reference * (1 - Decimal(5) / 10_000) - Decimal("0.0000001") <= price
                    assert price <= reference
    assert len(buy_prices) > 100  # slippage varies, it is not a constant markup


def test_zero_slippage_fills_at_the_reference() -> None:
    scheduled = simulate(make_intent(), venue(slippage_bps_max=0), NOW)
    assert scheduled[-1].report.last_price == Decimal("1.08456")


def test_no_known_price_is_rejected_not_filled_at_an_invented_price() -> None:
    intent = make_intent(reference_price=None)
    scheduled = simulate(intent, venue(), NOW)
    last = scheduled[-1].report
    assert last.status is ReportStatus.REJECTED
    assert last.reason_code is ReasonCode.OTHER
    assert last.reason_text is not None
    assert "no price" in last.reason_text.lower()
    assert all(s.report.last_price is None for s in scheduled)
    limit = simulate(make_intent(order_type="limit", reference_price="1.1"), venue(), NOW)
    assert limit[-1].report.status is ReportStatus.REJECTED
    assert limit[-1].report.reason_code is ReasonCode.OTHER


def test_cancel_reports_cancelled_for_the_parent_with_what_it_filled() -> None:
    cancel = make_intent("C-1", kind=IntentKind.CANCEL, parent_intent_id="I-9")
    scheduled = simulate(
        cancel,
        venue(),
        NOW,
        filled_so_far=Decimal("0.40"),
        avg_price_so_far=Decimal("1.08"),
    )
    assert len(scheduled) == 1
    report = scheduled[0].report
    assert report.status is ReportStatus.CANCELLED
    assert report.intent_id == "I-9"
    assert report.order_id == order_id("I-9")
    assert report.filled_quantity == Decimal("0.40")
    assert report.avg_price == Decimal("1.08")
    assert report.leaves_quantity == 0
    assert report.last_quantity == 0
    parent_ids = {s.report.report_id for s in simulate(make_intent("I-9"), venue(), NOW)}
    assert report.report_id not in parent_ids
    # Without what the parent filled, it filled nothing.
    assert simulate(cancel, venue(), NOW)[0].report.filled_quantity == 0


def test_cancel_of_a_closed_parent_or_without_parent_is_refused() -> None:
    cancel = make_intent("C-1", kind=IntentKind.CANCEL, parent_intent_id="I-9")
    refused = simulate(cancel, venue(), NOW, parent_open=False)[-1].report
    assert refused.status is ReportStatus.REJECTED
    assert refused.intent_id == "C-1"
    assert refused.reason_code is ReasonCode.OTHER
    orphan = simulate(make_intent("C-2", kind=IntentKind.CANCEL), venue(), NOW)[-1].report
    assert orphan.status is ReportStatus.REJECTED
    assert orphan.reason_text is not None
    assert "parent_intent_id" in orphan.reason_text


# --- properties over random intents and venue settings ---------------------------------------

amounts = st.builds(
    lambda n, places: Decimal(n).scaleb(-places),
    st.integers(min_value=1, max_value=10**6),
    st.integers(min_value=0, max_value=5),
)
ratios = st.floats(min_value=0.0, max_value=1.0)


@st.composite
def intents(draw: st.DrawFn) -> OrderIntent:
    order_type = draw(st.sampled_from(OrderType))
    limit = draw(st.one_of(st.none(), amounts)) if order_type is OrderType.LIMIT else None
    return make_intent(
        draw(st.from_regex(r"[A-Za-z0-9-]{1,20}", fullmatch=True)),
        side=draw(st.sampled_from(["buy", "sell"])),
        order_type=order_type,
        quantity=draw(amounts),
        limit_price=limit,
        reference_price=draw(st.one_of(st.none(), amounts)),
        time_in_force=draw(st.sampled_from(TimeInForce)),
    )


@st.composite
def venues(draw: st.DrawFn) -> VenueConfig:
    lo = draw(st.floats(min_value=0, max_value=100))
    reasons = draw(st.lists(st.sampled_from(ReasonCode), unique=True, max_size=3))
    share = 1.0 / (len(reasons) + 1)
    return venue(
        seed=draw(st.integers(min_value=0, max_value=2**32)),
        latency_ms_min=lo,
        latency_ms_max=lo + draw(st.floats(min_value=0, max_value=100)),
        partial_fill_probability=draw(ratios),
        partial_fill_min_share=draw(ratios),
        reject_probability={r.value: draw(ratios) * share for r in reasons},
        slippage_bps_max=draw(st.decimals(min_value=0, max_value=50, places=2)),
    )


@settings(max_examples=300, deadline=None)
@given(intent=intents(), cfg=venues())
def test_property_reports_are_consistent_and_markets_terminate(
    intent: OrderIntent, cfg: VenueConfig
) -> None:
    scheduled = simulate(intent, cfg, NOW)
    assert scheduled[0].report.status is ReportStatus.ACCEPTED
    filled = [s.report.filled_quantity for s in scheduled]
    assert filled == sorted(filled)
    assert all(f <= intent.quantity for f in filled)
    assert_consistent(intent, scheduled)
    last = scheduled[-1].report
    if intent.order_type is OrderType.MARKET:
        assert last.status in (ReportStatus.FILLED, ReportStatus.REJECTED)
    if last.status is ReportStatus.FILLED:
        assert last.filled_quantity == intent.quantity
    # Only the last report may be terminal.
    assert all(s.report.status not in TERMINAL_STATUSES for s in scheduled[:-1])
    # Reports survive a JSON round trip unchanged (what the venue publishes is what it meant).
    for item in scheduled:
        again = ExecutionReport.model_validate_json(item.report.model_dump_json())
        assert again == item.report
