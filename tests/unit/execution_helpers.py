"""A small harness for the decider's order-following tests: a clock, a portfolio, the outputs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from orch_worker.domain.coordinator import IntentState, SignalState
from orch_worker.domain.decider import (
    Context,
    Decision,
    PortfolioState,
    next_wake,
    on_control,
    on_due,
    on_report,
    on_signal,
)
from orch_worker.domain.models import (
    AccountState,
    AuditEvent,
    ExecutionReport,
    ExecutionResult,
    IntentKind,
    Intervention,
    OrderIntent,
    ResultStatus,
    Signal,
)
from tests import factories as f

ACCOUNTS = ("ACC-1", "ACC-2", "ACC-3")


def config(**portfolio: Any) -> Any:
    """Three accounts, equal split, no stagger; `execution` and others as given."""
    instrument = portfolio.pop("instrument", {})
    cfg = f.config(**portfolio)
    if instrument:
        inst = cfg.instruments["EURUSD"].model_copy(update=instrument)
        cfg = cfg.model_copy(update={"instruments": {"EURUSD": inst}})
    return cfg


def limit_signal(signal_id: str = "sig-1", quantity: str = "1.00", **kw: Any) -> Signal:
    return f.signal(
        signal_id,
        quantity,
        order_type="limit",
        limit_price="1.1000",
        reference_price=None,
        **kw,
    )


class Run:
    """Feeds inputs through the decider with a clock in seconds after `f.NOW`."""

    def __init__(
        self,
        cfg: Any = None,
        accounts: dict[str, AccountState] | None = None,
        prices: dict[str, Decimal] | None = None,
    ) -> None:
        self.cfg = cfg or config()
        self.accounts = accounts or {a: f.account(a) for a in ACCOUNTS}
        self.prices: dict[str, Decimal] = prices or {}
        self.pf = PortfolioState(portfolio="demo")
        self.listening_since: dict[str, datetime] = {}
        self.t = 0.0
        self.decisions: list[Decision] = []
        self._n = 0

    @property
    def now(self) -> datetime:
        return f.NOW + timedelta(seconds=self.t)

    def ctx(self) -> Context:
        return Context(
            config=self.cfg,
            now=self.now,
            accounts=self.accounts,
            prices=self.prices,
            listening_since=self.listening_since,
        )

    def restart(self) -> Run:
        """The worker (re)starts listening now: as after a crash or a handover."""
        self.listening_since["demo"] = self.now
        return self

    def at(self, t: float) -> Run:
        self.t = t
        return self

    def keep(self, d: Decision) -> Decision:
        for r in d.results:  # built without validation: it must be what validation gives
            assert r == ExecutionResult.model_validate(r.model_dump()), r
            assert (
                r.model_dump_json()
                == ExecutionResult.model_validate_json(r.model_dump_json()).model_dump_json()
            )
            assert type(r.status) is ResultStatus
            assert r.updated_at.tzinfo is UTC
        self.pf = d.state
        self.decisions.append(d)
        return d

    def signal(self, sig: Signal | None = None) -> Decision:
        return self.keep(on_signal(self.pf, sig or f.signal(), self.ctx()))

    def report(
        self,
        it: OrderIntent | IntentState,
        status: str,
        filled: str = "0",
        *,
        price: str = "1.1001",
        code: str | None = None,
        signal_id: str = "sig-1",
        intent_id: str | None = None,
    ) -> Decision:
        intent = it.intent if isinstance(it, IntentState) else it
        self._n += 1
        r = f.report(
            intent_id or intent.intent_id,
            intent.account_id,
            status,
            filled,
            n=self._n,
            price=price,
            reason_code=code,
            at=self.now,
        )
        return self.keep(on_report(self.pf, signal_id, r, self.ctx()))

    def send(self, r: ExecutionReport, signal_id: str = "sig-1") -> Decision:
        return self.keep(on_report(self.pf, signal_id, r, self.ctx()))

    def due(self, signal_id: str = "sig-1") -> Decision:
        return self.keep(on_due(self.pf, [signal_id], self.ctx()))

    def wake(self, signal_id: str = "sig-1") -> Decision:
        """Move the clock to the signal's next wake-up and fire it."""
        when = next_wake(self.st(signal_id), self.cfg, self.listening_since.get("demo"))
        assert when is not None, "nothing waits for the clock"
        self.t = max(self.t, (when - f.NOW).total_seconds())
        return self.due(signal_id)

    def control(self, command_id: str, type_: str, **targets: Any) -> Decision:
        cmd = f.control(command_id, type_, at=self.now, **targets)
        return self.keep(on_control(self.pf, cmd, self.ctx()))

    def resolve(
        self, iv: Intervention, action: str, command_id: str = "c-1", **kw: Any
    ) -> Decision:
        return self.control(
            command_id,
            "resolve_intervention",
            intervention_id=iv.intervention_id,
            signal_id=iv.signal_id,
            action=action,
            **kw,
        )

    # -- reading -------------------------------------------------------------------------------

    def st(self, signal_id: str = "sig-1") -> SignalState:
        return self.pf.signals[signal_id]

    def status(self, signal_id: str = "sig-1") -> ResultStatus:
        return self.st(signal_id).status

    def intents(self, signal_id: str = "sig-1") -> tuple[IntentState, ...]:
        return self.st(signal_id).intents

    def on(self, account: str, signal_id: str = "sig-1") -> list[IntentState]:
        return [i for i in self.intents(signal_id) if i.intent.account_id == account]

    def last(self, account: str, signal_id: str = "sig-1") -> IntentState:
        return self.on(account, signal_id)[-1]

    @property
    def audit(self) -> list[AuditEvent]:
        return [e for d in self.decisions for e in d.audit]

    def types(self) -> list[str]:
        return [e.type for e in self.audit]

    def of_type(self, kind: str) -> list[AuditEvent]:
        return [e for e in self.audit if e.type == kind]

    @property
    def published(self) -> list[OrderIntent]:
        return [i for d in self.decisions for i in d.intents]

    def published_kinds(self) -> list[tuple[str, str, int]]:
        return [(i.account_id, i.kind.value, i.attempt) for i in self.published]

    @property
    def interventions(self) -> list[Intervention]:
        return [i for d in self.decisions for i in d.interventions]

    def cancels(self) -> list[OrderIntent]:
        return [i for i in self.published if i.kind is IntentKind.CANCEL]
