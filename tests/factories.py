"""Builders for test inputs: a small portfolio configuration, account states, signals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from orch_worker.domain.config import KafkaConfig, OrchConfig
from orch_worker.domain.models import AccountState, ControlCommand, ExecutionReport, Signal

NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)


def config(kafka: KafkaConfig | None = None, n_accounts: int = 3, **portfolio: Any) -> OrchConfig:
    return OrchConfig.model_validate(
        {
            "kafka": (kafka or KafkaConfig()).model_dump(),
            # A group per test, like its topics (see tests/integration/test_processes._env).
            "worker": {
                "http_port": 0,
                "max_signal_age_s": 3600,
                **({"group_id": f"{kafka.topic_prefix}worker"} if kafka else {}),
            },
            "instruments": {
                "EURUSD": {
                    "value_per_unit": "100000",
                    "lot_step": "0.01",
                    "min_quantity": "0.01",
                    "max_quantity": "50",
                    "margin_rate": "0.0333",
                }
            },
            # No stagger unless a test asks for one: most tests are about other things.
            "portfolios": {
                "demo": {"allocation": "equal", "stagger": {"min_s": 0, "max_s": 0}, **portfolio}
            },
            "accounts": {f"ACC-{i}": {"portfolio": "demo"} for i in range(1, n_accounts + 1)},
        }
    )


def account(
    account_id: str,
    *,
    equity: str = "100000",
    margin_available: str = "90000",
    status: str = "active",
    portfolio: str = "demo",
    at: datetime = NOW,
    positions: tuple[dict[str, Any], ...] = (),
) -> AccountState:
    return AccountState.model_validate(
        {
            "account_id": account_id,
            "portfolio": portfolio,
            "broker": "paper",
            "status": status,
            "currency": "USD",
            "balance": equity,
            "equity": equity,
            "margin_used": "0",
            "margin_available": margin_available,
            "day_start_equity": equity,
            "peak_equity": equity,
            "positions": positions,
            "updated_at": at,
        }
    )


def signal(
    signal_id: str = "sig-1", quantity: str = "1.00", at: datetime = NOW, **kw: Any
) -> Signal:
    doc: dict[str, Any] = {
        "signal_id": signal_id,
        "portfolio": "demo",
        "strategy_id": "trend-1",
        "symbol": "EURUSD",
        "side": "buy",
        "order_type": "market",
        "reference_price": "1.1000",
        "stop_loss": "1.0950",
        "quantity": quantity,
        "created_at": at,
    }
    doc.update(kw)
    return Signal.model_validate(doc)


def report(
    intent_id: str,
    account_id: str,
    status: str,
    filled: str = "0",
    *,
    n: int = 1,
    last_qty: str | None = None,
    price: str | None = "1.1001",
    reason_code: str | None = None,
    at: datetime = NOW,
) -> ExecutionReport:
    return ExecutionReport.model_validate(
        {
            "report_id": f"{intent_id}-r{n}",
            "intent_id": intent_id,
            "account_id": account_id,
            "order_id": f"ord-{intent_id}",
            "status": status,
            "filled_quantity": filled,
            "last_quantity": last_qty if last_qty is not None else filled,
            "last_price": price if Decimal(filled) > 0 else None,
            "avg_price": price if Decimal(filled) > 0 else None,
            "leaves_quantity": "0",
            "reason_code": reason_code,
            "reason_text": "simulated" if reason_code else None,
            "venue_time": at + timedelta(milliseconds=10 * n),
        }
    )


def control(command_id: str, type_: str, at: datetime = NOW, **targets: Any) -> ControlCommand:
    return ControlCommand.model_validate(
        {
            "command_id": command_id,
            "type": type_,
            "issued_by": "ops@test",
            "issued_at": at,
            **targets,
        }
    )
