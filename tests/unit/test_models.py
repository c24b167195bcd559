"""Input events are validated with clear errors; output fields have one wire form.

Decimals arrive as JSON numbers or strings and leave as strings; timestamps leave as RFC 3339
UTC with microseconds; anything misspelt, non-finite, negative or inconsistent is refused.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from orch_worker.domain.models import (
    AccountState,
    ControlCommand,
    ControlType,
    ExecutionReport,
    OrderType,
    Side,
    Signal,
    as_json,
)
from tests import factories as f

RFC3339_UTC_MICROS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


def signal_doc(**overrides: Any) -> dict[str, Any]:
    doc = f.signal().model_dump(mode="json")
    doc.update(overrides)
    return doc


def report_doc(**overrides: Any) -> dict[str, Any]:
    doc = f.report("I-1", "ACC-1", "filled", "0.50").model_dump(mode="json")
    doc.update(overrides)
    return doc


def control_doc(type_: str, **targets: Any) -> dict[str, Any]:
    return {
        "command_id": "cmd-1",
        "type": type_,
        "issued_by": "ops@test",
        "issued_at": "2026-11-21T12:00:00Z",
        **targets,
    }


def errors_of(exc: pytest.ExceptionInfo[ValidationError]) -> list[tuple[tuple[Any, ...], str]]:
    return [(e["loc"], e["type"]) for e in exc.value.errors()]


# --- decimals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1.01", "1.01"),  # JSON string
        (1.01, "1.01"),  # JSON number
        (2, "2"),
        (0.1, "0.1"),  # never the binary expansion 0.1000000000000000055...
        ("1E-7", "0.0000001"),  # exponent form emitted as plain digits
        ("0.010", "0.010"),  # scale is kept: strings round-trip exactly
    ],
)
def test_quantity_is_accepted_as_json_number_or_string_and_emitted_as_string(
    raw: Any, expected: str
) -> None:
    sig = Signal.model_validate_json(json.dumps(signal_doc(quantity=raw)))

    assert sig.quantity == Decimal(expected)
    assert as_json(sig)["quantity"] == expected
    assert f'"quantity":"{expected}"' in sig.model_dump_json()


def test_python_float_from_an_in_process_caller_becomes_its_short_decimal() -> None:
    sig = Signal.model_validate(signal_doc(quantity=0.1, reference_price=1.1))

    assert sig.quantity == Decimal("0.1")
    assert sig.reference_price == Decimal("1.1")


def test_every_decimal_field_of_an_execution_report_is_emitted_as_a_string() -> None:
    rep = ExecutionReport.model_validate_json(
        json.dumps(
            report_doc(
                filled_quantity=0.5,
                last_quantity=0.5,
                last_price=1.1001,
                avg_price=1.1001,
                leaves_quantity=0,
            )
        )
    )

    out = as_json(rep)
    for name in ("filled_quantity", "last_quantity", "last_price", "avg_price", "leaves_quantity"):
        assert isinstance(out[name], str), name
    assert out["last_price"] == "1.1001"


@pytest.mark.parametrize("raw", ["NaN", "nan", "sNaN", "Infinity", "-Infinity", "inf"])
def test_non_finite_decimal_strings_are_refused(raw: str) -> None:
    with pytest.raises(ValidationError, match="finite") as exc:
        Signal.model_validate(signal_doc(quantity=raw))

    assert errors_of(exc)[0][0] == ("quantity",)


@pytest.mark.parametrize("raw", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_python_floats_are_refused(raw: float) -> None:
    with pytest.raises(ValidationError, match="finite"):
        Signal.model_validate(signal_doc(reference_price=raw))


def test_json_number_overflowing_to_infinity_is_refused() -> None:
    text = json.dumps(signal_doc()).replace('"quantity": "1.00"', '"quantity": 1e400')
    assert "1e400" in text

    with pytest.raises(ValidationError, match="finite"):
        Signal.model_validate_json(text)


@pytest.mark.parametrize("raw", ["-1", "-0.01", -5, "0", "-0"])
def test_signal_quantity_must_be_strictly_positive(raw: Any) -> None:
    with pytest.raises(ValidationError, match="greater than 0") as exc:
        Signal.model_validate(signal_doc(quantity=raw))

    assert errors_of(exc) == [(("quantity",), "greater_than")]


@pytest.mark.parametrize(
    "field", ["filled_quantity", "last_quantity", "leaves_quantity", "last_price", "avg_price"]
)
def test_execution_report_refuses_negative_quantities_and_prices(field: str) -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 0") as exc:
        ExecutionReport.model_validate(report_doc(**{field: "-0.01"}))

    assert (field,) in [loc for loc, _ in errors_of(exc)]


def test_account_state_refuses_negative_margin_used_but_allows_negative_equity() -> None:
    doc = f.account("ACC-1").model_dump(mode="json")

    with pytest.raises(ValidationError, match="margin_used"):
        AccountState.model_validate({**doc, "margin_used": "-1"})
    # Equity can really go negative (a gap through the stop); it must still be representable.
    assert AccountState.model_validate({**doc, "equity": "-12.50"}).equity == Decimal("-12.50")


def test_garbage_decimal_is_refused_with_the_field_named() -> None:
    with pytest.raises(ValidationError, match="quantity") as exc:
        Signal.model_validate(signal_doc(quantity="one lot"))

    assert errors_of(exc) == [(("quantity",), "decimal_parsing")]


@settings(max_examples=60, deadline=None)
@given(
    st.decimals(
        min_value=Decimal("0.00000001"),
        max_value=Decimal("1000000"),
        allow_nan=False,
        allow_infinity=False,
        places=8,
    )
)
def test_decimal_strings_round_trip_exactly_through_json(value: Decimal) -> None:
    sig = Signal.model_validate_json(json.dumps(signal_doc(quantity=str(value))))
    again = Signal.model_validate_json(sig.model_dump_json())

    assert again.quantity == value
    assert Decimal(as_json(again)["quantity"]) == value


# --- timestamps -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", ["2026-11-21T12:00:00", "2026-11-21 12:00:00", datetime(2026, 11, 21, 12)]
)
def test_naive_timestamps_are_refused(raw: Any) -> None:
    with pytest.raises(ValidationError, match="UTC offset") as exc:
        Signal.model_validate(signal_doc(created_at=raw))

    assert errors_of(exc)[0][0] == ("created_at",)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2026-11-21T12:00:00Z", "2026-11-21T12:00:00.000000Z"),
        ("2026-11-21T13:30:00+01:30", "2026-11-21T12:00:00.000000Z"),
        ("2026-11-21T07:00:00.25-05:00", "2026-11-21T12:00:00.250000Z"),
        ("2026-11-21T12:00:00.123456+00:00", "2026-11-21T12:00:00.123456Z"),
    ],
)
def test_timestamps_are_emitted_rfc3339_utc_with_microseconds(raw: str, expected: str) -> None:
    sig = Signal.model_validate(signal_doc(created_at=raw))

    assert as_json(sig)["created_at"] == expected
    assert sig.created_at.tzinfo is UTC


def test_every_timestamp_of_an_emitted_intent_uses_the_one_format() -> None:
    from orch_worker.domain.decider import Context, PortfolioState, on_signal

    accounts = {a: f.account(a) for a in ("ACC-1", "ACC-2", "ACC-3")}
    decision = on_signal(
        PortfolioState(portfolio="demo"),
        f.signal(),
        Context(config=f.config(), now=f.NOW, accounts=accounts),
    )

    out = as_json(decision.intents[0])
    assert RFC3339_UTC_MICROS.match(out["scheduled_at"])
    assert RFC3339_UTC_MICROS.match(out["released_at"])
    assert RFC3339_UTC_MICROS.match(as_json(decision.results[0])["updated_at"])
    assert all(RFC3339_UTC_MICROS.match(as_json(e)["ts"]) for e in decision.audit)


@settings(max_examples=60, deadline=None)
@given(
    st.datetimes(
        min_value=datetime(2000, 1, 1),
        max_value=datetime(2100, 1, 1),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=5, minutes=45)), timezone(timedelta(hours=-8))]
        ),
    )
)
def test_any_aware_timestamp_round_trips_as_the_same_instant_in_utc(moment: datetime) -> None:
    sig = Signal.model_validate(signal_doc(created_at=moment))
    text = as_json(sig)["created_at"]

    assert RFC3339_UTC_MICROS.match(text)
    assert Signal.model_validate(signal_doc(created_at=text)).created_at == moment


# --- unknown fields and cross-field rules ------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "doc"),
    [
        (Signal, lambda: signal_doc(quantitty="1.00")),
        (ExecutionReport, lambda: report_doc(fill_qty="1")),
        (AccountState, lambda: {**f.account("ACC-1").model_dump(mode="json"), "leverage": 30}),
        (ControlCommand, lambda: control_doc("halt", portfolio="demo", force=True)),
    ],
    ids=["signal", "report", "account_state", "control"],
)
def test_unknown_fields_are_refused_and_named(model: type[Any], doc: Any) -> None:
    with pytest.raises(ValidationError) as exc:
        model.model_validate(doc())

    [(loc, kind)] = errors_of(exc)
    assert kind == "extra_forbidden"
    assert loc[0] in {"quantitty", "fill_qty", "leverage", "force"}


def test_limit_order_without_limit_price_is_refused() -> None:
    with pytest.raises(ValidationError, match="limit orders need limit_price"):
        Signal.model_validate(signal_doc(order_type="limit", limit_price=None))


def test_limit_order_with_limit_price_is_accepted() -> None:
    sig = Signal.model_validate(signal_doc(order_type="limit", limit_price="1.0990"))

    assert sig.order_type is OrderType.LIMIT
    assert sig.entry_price == Decimal("1.0990")


def test_market_order_carrying_a_limit_price_is_refused() -> None:
    with pytest.raises(ValidationError, match="market orders must not carry limit_price"):
        Signal.model_validate(signal_doc(limit_price="1.1"))


@pytest.mark.parametrize(
    ("side", "stop_loss"),
    [("buy", "1.1050"), ("buy", "1.1000"), ("sell", "1.0950"), ("sell", "1.1000")],
)
def test_stop_loss_on_the_wrong_side_of_entry_is_refused(side: str, stop_loss: str) -> None:
    with pytest.raises(ValidationError, match=f"a {side}'s stop_loss must be"):
        Signal.model_validate(signal_doc(side=side, reference_price="1.1000", stop_loss=stop_loss))


@pytest.mark.parametrize(("side", "stop_loss"), [("buy", "1.0950"), ("sell", "1.1050")])
def test_stop_loss_on_the_protective_side_is_accepted(side: str, stop_loss: str) -> None:
    sig = Signal.model_validate(
        signal_doc(side=side, reference_price="1.1000", stop_loss=stop_loss)
    )

    assert sig.side is Side(side)


def test_stop_loss_side_is_judged_against_the_limit_price_not_the_reference() -> None:
    # Entry for a limit order is its limit: 1.15 is below a 1.20 limit even though it is above
    # the 1.10 reference, so the buy's stop is on the protective side.
    sig = Signal.model_validate(
        signal_doc(
            order_type="limit", limit_price="1.2000", reference_price="1.1000", stop_loss="1.1500"
        )
    )
    assert sig.entry_price == Decimal("1.2000")

    with pytest.raises(ValidationError, match="stop_loss must be below"):
        Signal.model_validate(
            signal_doc(
                order_type="limit",
                limit_price="1.1000",
                reference_price="1.2000",
                stop_loss="1.1500",
            )
        )


def test_expiry_not_after_creation_is_refused() -> None:
    with pytest.raises(ValidationError, match="expires_at must be after created_at"):
        Signal.model_validate(
            signal_doc(created_at="2026-11-21T12:00:00Z", expires_at="2026-11-21T12:00:00Z")
        )


@pytest.mark.parametrize("confidence", [-0.1, 1.01, "nan"])
def test_confidence_outside_zero_to_one_is_refused(confidence: Any) -> None:
    with pytest.raises(ValidationError, match="confidence"):
        Signal.model_validate(signal_doc(confidence=confidence))


def test_rejected_report_without_reason_code_is_refused() -> None:
    with pytest.raises(ValidationError, match="a rejected report needs reason_code"):
        ExecutionReport.model_validate(
            report_doc(
                status="rejected",
                filled_quantity="0",
                last_quantity="0",
                last_price=None,
                avg_price=None,
            )
        )


def test_rejected_report_with_reason_code_is_accepted() -> None:
    rep = f.report("I-1", "ACC-1", "rejected", reason_code="insufficient_margin")

    assert rep.reason_code is not None
    assert rep.reason_code.value == "insufficient_margin"


def test_unknown_reason_code_is_refused() -> None:
    with pytest.raises(ValidationError, match="reason_code"):
        ExecutionReport.model_validate(report_doc(status="rejected", reason_code="bad_luck"))


def test_last_quantity_above_cumulative_filled_is_refused() -> None:
    with pytest.raises(ValidationError, match="last_quantity cannot exceed"):
        ExecutionReport.model_validate(report_doc(filled_quantity="0.2", last_quantity="0.3"))


@pytest.mark.parametrize(
    ("type_", "targets", "missing"),
    [
        ("pause_account", {}, "account_id"),
        ("resume_account", {"portfolio": "demo"}, "account_id"),
        ("halt", {"account_id": "ACC-1"}, "portfolio"),
        ("resume", {}, "portfolio"),
        ("cancel_signal", {"portfolio": "demo"}, "signal_id"),
        ("resolve_intervention", {"action": "retry"}, "intervention_id"),
        ("resolve_intervention", {"intervention_id": "iv-1"}, "action"),
        ("resolve_intervention", {}, "intervention_id, action"),
    ],
)
def test_control_command_without_its_targets_is_refused_naming_them(
    type_: str, targets: dict[str, str], missing: str
) -> None:
    with pytest.raises(ValidationError, match=f"{type_} needs {missing}"):
        ControlCommand.model_validate(control_doc(type_, **targets))


@pytest.mark.parametrize(
    ("type_", "targets"),
    [
        ("pause_account", {"account_id": "ACC-1"}),
        ("resume_account", {"account_id": "ACC-1"}),
        ("halt", {"portfolio": "demo"}),
        ("resume", {"portfolio": "demo"}),
        ("cancel_signal", {"signal_id": "sig-1"}),
        ("resolve_intervention", {"intervention_id": "iv-1", "action": "accept_partial"}),
    ],
)
def test_control_command_with_its_targets_is_accepted(type_: str, targets: dict[str, str]) -> None:
    cmd = ControlCommand.model_validate(control_doc(type_, **targets))

    assert cmd.type is ControlType(type_)


def test_unknown_control_type_is_refused() -> None:
    with pytest.raises(ValidationError, match="type"):
        ControlCommand.model_validate(control_doc("liquidate_everything", portfolio="demo"))


def test_control_signature_must_be_hex_sha256() -> None:
    with pytest.raises(ValidationError, match="signature"):
        ControlCommand.model_validate(control_doc("halt", portfolio="demo", signature="abc"))


def test_signing_payload_excludes_the_signature() -> None:
    unsigned = ControlCommand.model_validate(control_doc("halt", portfolio="demo"))
    signed = ControlCommand.model_validate(
        control_doc("halt", portfolio="demo", signature="a" * 64)
    )

    assert signed.signing_payload() == unsigned.signing_payload()
    assert b"signature" not in signed.signing_payload()


@pytest.mark.parametrize("field", ["signal_id", "portfolio"])
def test_identifiers_with_spaces_or_empty_are_refused(field: str) -> None:
    for bad in ("", "has space", "x" * 129):
        with pytest.raises(ValidationError, match=field):
            Signal.model_validate(signal_doc(**{field: bad}))


def test_events_are_frozen() -> None:
    sig = f.signal()

    with pytest.raises(ValidationError, match="frozen"):
        sig.quantity = Decimal(2)  # type: ignore[misc]


def test_future_schema_version_is_refused() -> None:
    with pytest.raises(ValidationError, match="schema_version"):
        Signal.model_validate(signal_doc(schema_version=2))
