"""Following one signal's orders: the intent table's effects, recovery, completion, escalation.

`coordinator.step` says what follows a transition; `Follow` does it, purely, for one signal: it
adds the next attempt (a new intent with a deterministic id, kind and parent), builds cancel
intents, opens and resolves interventions, counts account failures for the circuit breaker, and
writes an audit draft for every transition and decision with its reason. Nothing is published
here: every output is collected in a `Work` the decider turns into one `Decision`.

Every follow-up of an order is a new intent: a `retry` or `reduced` one on the same account, a
`completion` (a re-priced remainder) on the same account, a `reroute` to another account
re-checked against its rules at that moment. Each kind is bounded per original order, so a
signal fed any complete sequence of reports and timeouts ends terminal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from typing import Any

from pydantic import JsonValue

from orch_worker.domain import ids
from orch_worker.domain.audit import AuditDraft
from orch_worker.domain.config import ExecutionConfig, InstrumentConfig, OrchConfig
from orch_worker.domain.coordinator import (
    AT_VENUE,
    OPEN,
    CancelPurpose,
    Effect,
    IntentEvent,
    IntentState,
    IntentStatus,
    ReportOutcome,
    SignalState,
    Step,
    Timing,
    Trigger,
    report_trigger,
    step,
)
from orch_worker.domain.interventions import (
    LATE_FILL,
    OVERFILL,
    UNKNOWN_OUTCOME,
    InterventionState,
    new_intervention,
    resolved,
)
from orch_worker.domain.models import (
    AccountState,
    ExecutionReport,
    IntentKind,
    Intervention,
    InterventionAction,
    OrderIntent,
    OrderType,
    ReportStatus,
    ResultStatus,
    Signal,
)
from orch_worker.domain.plan import Allocation
from orch_worker.domain.planner import PlanContext, plan_signal
from orch_worker.domain.recovery import (
    BREAKER_CODES,
    TRANSIENT,
    AccountHealth,
    Remedy,
    adjusted_stop,
    backoff_s,
    classify,
    next_session_open,
    record_failure,
    repriced_limit,
    suspend,
)
from orch_worker.domain.scheduling import drift_bps
from orch_worker.domain.types import format_ts

A = InterventionAction
_FOLLOW_KINDS = frozenset({IntentKind.COMPLETION, IntentKind.REROUTE})
"""Attempts that complete a partial fill, bounded together by `max_completion_attempts`."""
_TRANSIENT_CODES = frozenset(c.value for c in TRANSIENT)


@dataclass(frozen=True, slots=True)
class Env:
    """What the decisions read besides the signal's state: configuration, time, market."""

    config: OrchConfig
    now: datetime
    accounts: Mapping[str, AccountState]
    prices: Mapping[str, Decimal]
    paused: frozenset[str] = frozenset()
    halted: bool = False
    listening_since: datetime | None = None
    """When this worker began reading the portfolio's reports (see `effective_deadline`)."""

    def execution(self, portfolio: str) -> ExecutionConfig:
        return self.config.portfolios[portfolio].execution

    def timing(self, portfolio: str) -> Timing:
        exe = self.execution(portfolio)
        return Timing(exe.ack_timeout_s, exe.completion_timeout_s)


@dataclass(slots=True)
class Work:
    """Everything one decision produces, in order, and the accounts' health as it goes."""

    health: dict[str, AccountHealth]
    drafts: list[AuditDraft] = field(default_factory=list)
    intents: list[OrderIntent] = field(default_factory=list)
    interventions: list[Intervention] = field(default_factory=list)

    def resting(self, now: datetime) -> frozenset[str]:
        return frozenset(a for a, h in self.health.items() if h.resting(now))


def lots_down(quantity: Decimal, inst: InstrumentConfig) -> Decimal:
    """`quantity` rounded down to the instrument's lot step: never send more than is left."""
    return (quantity / inst.lot_step).to_integral_value(ROUND_FLOOR) * inst.lot_step


def _used(st: SignalState, it: IntentState, kinds: frozenset[IntentKind]) -> int:
    return sum(1 for i in st.lineage(it.intent.intent_id) if i.intent.kind in kinds)


def _recovered(st: SignalState, it: IntentState, reasons: frozenset[str]) -> int:
    return sum(1 for i in st.lineage(it.intent.intent_id) if i.recovery in reasons)


def effective_deadline(
    it: IntentState, exe: ExecutionConfig, listening_since: datetime | None
) -> datetime | None:
    """When the order's timeout really runs out, given when we began listening for reports.

    A timeout means "the venue said nothing for this long", which is only known for time we
    spent reading its reports. After a restart or a handover the reports of the down time wait
    unread in the backlog, so a deadline that ran out while nobody listened is pushed to one
    full window after listening began; otherwise every open order would be escalated as an
    unknown outcome (and its account's breaker tripped) moments before its fill is read.
    """
    if it.deadline is None or listening_since is None:
        return it.deadline
    acking = it.status in (IntentStatus.RELEASED, IntentStatus.CANCEL_REQUESTED)
    window = exe.ack_timeout_s if acking else exe.completion_timeout_s
    return max(it.deadline, listening_since + timedelta(seconds=window))


def next_wake(
    st: SignalState, exe: ExecutionConfig, listening_since: datetime | None = None
) -> datetime | None:
    """The earliest time-driven step of the signal: a release (or its expiry), an order's
    timeout, an intervention's deadline; None when nothing waits for the clock."""
    times: list[datetime] = []
    pending = [i.intent.scheduled_at for i in st.intents if i.status is IntentStatus.SCHEDULED]
    if pending:
        times.append(min(pending))
        if st.signal.expires_at is not None:
            times.append(st.signal.expires_at)
    for i in st.intents:
        if i.status in OPEN and (due := effective_deadline(i, exe, listening_since)) is not None:
            times.append(due)
    times += [iv.intervention.timeout_at for iv in st.open_interventions]
    return min(times) if times else None


def expiry_reason(
    signal: Signal, max_drift_bps: float | None, prices: Mapping[str, Decimal], now: datetime
) -> str | None:
    """Why an intent must not be released now: the signal expired, or the price drifted."""
    if signal.expires_at is not None and now >= signal.expires_at:
        return f"EXPIRED: signal expired at {format_ts(signal.expires_at)}"
    price = prices.get(signal.symbol)
    ref = signal.reference_price or signal.limit_price
    if max_drift_bps is not None and price is not None and ref is not None:
        moved = drift_bps(float(ref), float(price))
        if moved > max_drift_bps:
            return (
                f"PRICE_DRIFT: {signal.symbol} at {price} is {moved:.1f} bps from the "
                f"signal's {ref}, budget {max_drift_bps:g} bps"
            )
    return None


def wake_rested(
    health: dict[str, AccountHealth], now: datetime, portfolio: str
) -> list[AuditDraft]:
    """End the rests that are over (audited: the account plans again), in `health` itself."""
    drafts: list[AuditDraft] = []
    for account, h in sorted(health.items()):
        update: dict[str, object] = {}
        if h.breaker_until is not None and h.breaker_until <= now:
            update["breaker_until"] = None
            drafts.append(
                AuditDraft(
                    type="circuit_closed",
                    account_id=account,
                    rationale=f"{account} back in planning: its circuit breaker cooled down at "
                    f"{format_ts(h.breaker_until)}",
                    data={"closed_at": format_ts(h.breaker_until), "portfolio": portfolio},
                )
            )
        if h.suspended_until is not None and h.suspended_until <= now:
            update["suspended_until"] = None
            drafts.append(
                AuditDraft(
                    type="account_cooldown_ended",
                    account_id=account,
                    rationale=f"{account} back in planning: its suspension cooldown ended at "
                    f"{format_ts(h.suspended_until)}",
                    data={"ended_at": format_ts(h.suspended_until), "portfolio": portfolio},
                )
            )
        if update:
            health[account] = h.model_copy(update=update)
    return drafts


# --- audit texts ----------------------------------------------------------------------------------


def _why(current: IntentState, new: IntentState, event: IntentEvent, result: Step) -> str:
    report = event.report
    if report is not None and event.trigger is not Trigger.CANCEL_REFUSED:
        if result.outcome is not ReportOutcome.APPLIED:
            return (
                f"{report.status.value} report while {current.status.value}: "
                f"{result.outcome.value}"
                + (f", late fill of {result.fill_delta} counted" if result.fill_delta else "")
            )
        why = f"{current.status.value} -> {new.status.value} on {report.status.value} report"
        if result.fill_delta:
            why += f", filled {result.fill_delta} @ {report.last_price} (total {new.filled})"
        if event.trigger is Trigger.PARTIAL_FILL_ENOUGH:
            why += ": at the accept threshold, the rest is cancelled"
        if new.reason and report.reason_code is not None:
            why += f" ({new.reason})"
        return why
    if result.outcome is not ReportOutcome.APPLIED:
        return f"{event.trigger.value} while {current.status.value}: {result.outcome.value}"
    why = f"{current.status.value} -> {new.status.value} on {event.trigger.value}"
    return why + (f": {event.reason}" if event.reason else "")


def _transition_data(
    current: IntentState, new: IntentState, event: IntentEvent, result: Step
) -> dict[str, JsonValue]:
    data: dict[str, JsonValue] = {
        "trigger": event.trigger.value,
        "from_status": current.status.value,
        "intent_status": new.status.value,
        "effects": [e.value for e in result.effects],
        "outcome": result.outcome.value,
        "filled_quantity": str(new.filled),
        "quantity": str(new.intent.quantity),
    }
    report = event.report
    if report is not None:
        data |= {
            "report_id": report.report_id,
            "report_status": report.status.value,
            "fill_delta": str(result.fill_delta),
            "last_price": str(report.last_price) if report.last_price is not None else None,
            "reason_code": report.reason_code.value if report.reason_code else None,
        }
    if event.reason is not None:
        data["reason"] = event.reason
    if new.deadline is not None and new.deadline != current.deadline:
        data["deadline"] = format_ts(new.deadline)
    if event.purpose is not None and Effect.SEND_CANCEL in result.effects:
        data["cancel_purpose"] = event.purpose.value
    return data


def _timeout_event(it: IntentState, exe: ExecutionConfig, now: datetime) -> IntentEvent:
    if it.status in (IntentStatus.RELEASED, IntentStatus.CANCEL_REQUESTED):
        what = "order" if it.status is IntentStatus.RELEASED else "cancel"
        return IntentEvent(
            Trigger.TIMEOUT,
            now,
            reason=f"UNKNOWN_OUTCOME: no venue report on the {what} within {exe.ack_timeout_s:g}s",
        )
    share = it.filled / it.intent.quantity
    accept = share >= Decimal(str(exe.partial_fill_threshold))
    return IntentEvent(
        Trigger.TIMEOUT,
        now,
        purpose=CancelPurpose.ACCEPT if accept else CancelPurpose.COMPLETE,
        reason=f"COMPLETION_TIMEOUT: {it.filled} of {it.intent.quantity} filled "
        f"{exe.completion_timeout_s:g}s after acceptance; "
        + (
            f"{share:.0%} reaches the {exe.partial_fill_threshold:.0%} threshold, the rest is "
            "cancelled"
            if accept
            else "the rest is cancelled to be completed"
        ),
    )


class Follow:
    """Follows one signal's orders within one decision: reads `env`, appends to `work`.

    Every method takes the signal's state and returns the new one (states are immutable); the
    outputs (intents, interventions, audit drafts, account health) accumulate in `work`.
    """

    def __init__(self, env: Env, work: Work) -> None:
        self.env = env
        self.work = work

    # -- plumbing ------------------------------------------------------------------------------

    def _exe(self, st: SignalState) -> ExecutionConfig:
        return self.env.execution(st.signal.portfolio)

    def _inst(self, st: SignalState) -> InstrumentConfig:
        return self.env.config.instruments[st.signal.symbol]

    def _audit(
        self,
        kind: str,
        st: SignalState,
        rationale: str,
        data: dict[str, JsonValue],
        *,
        it: IntentState | None = None,
        account_id: str | None = None,
    ) -> None:
        self.work.drafts.append(
            AuditDraft(
                type=kind,
                signal_id=st.signal.signal_id,
                intent_id=it.intent.intent_id if it is not None else None,
                account_id=account_id or (it.intent.account_id if it is not None else None),
                rationale=rationale,
                data=data,
            )
        )

    # -- driving one intent through the table --------------------------------------------------

    def drive(
        self,
        st: SignalState,
        intent_id: str,
        event: IntentEvent,
        *,
        audit_type: str = "intent_transition",
        rationale: str | None = None,
        data: dict[str, JsonValue] | None = None,
    ) -> tuple[SignalState, Step]:
        """Apply one trigger to one intent, audit it, then perform the effects it returned."""
        current = st.intent(intent_id)
        if current is None:
            raise KeyError(intent_id)
        result = step(current, event, self.env.timing(st.signal.portfolio))
        if result.outcome is ReportOutcome.DUPLICATE:
            return st, result
        new = result.state
        self._audit(
            audit_type,
            st,
            rationale or _why(current, new, event, result),
            _transition_data(current, new, event, result) | (data or {}),
            it=new,
        )
        st = st.with_intent(new)
        if new.overfilled and not current.overfilled:
            st = self._overfill(st, new, event)
        if new.late_fill and not current.late_fill:
            st = self._late_fill(st, new, event)
        for effect in result.effects:
            st = self._perform(st, intent_id, effect, event)
        return st, result

    def _perform(
        self, st: SignalState, intent_id: str, effect: Effect, event: IntentEvent
    ) -> SignalState:
        it = st.intent(intent_id)
        assert it is not None  # driven just now
        match effect:
            case Effect.PUBLISH:
                self.work.intents.append(it.intent)
            case Effect.SEND_CANCEL:
                st = self._send_cancel(st, it, event.reason or "cancel requested")
            case Effect.ARM_ACK_TIMER | Effect.ARM_COMPLETION_TIMER:
                pass  # the deadline is in the state; `next_wake` hands it to the shell's timers
            case Effect.RECOVER:
                st = self._recover(st, it)
            case Effect.FOLLOW_UP:
                st = self._follow_up(st, it)
            case Effect.ESCALATE:
                self._failure(st, it.intent.account_id, "unknown outcome (no venue report)")
                st = self._escalate(st, it, UNKNOWN_OUTCOME, event.reason or "no venue report")
            case Effect.SETTLE_ESCALATION:
                report = event.report
                what = report.status.value if report is not None else event.trigger.value
                st = self._settle(st, it, f"the venue reported {what}")
        return st

    def _send_cancel(self, st: SignalState, it: IntentState, why: str) -> SignalState:
        target = it.intent
        n = len(it.cancel_ids)
        key = "cancel" if n == 0 else f"cancel-{n + 1}"  # a repeated cancel needs its own id
        cancel = target.model_copy(
            update={
                "intent_id": ids.intent_id(
                    st.signal.signal_id, target.account_id, target.attempt, key
                ),
                "kind": IntentKind.CANCEL,
                "parent_intent_id": target.intent_id,
                "scheduled_at": self.env.now,
                "released_at": self.env.now,
                "rationale": why,
            }
        )
        self.work.intents.append(cancel)
        new = it.model_copy(update={"cancel_ids": (*it.cancel_ids, cancel.intent_id)})
        return st.with_intent(new)

    # -- inputs: reports, timers, releases, cancels --------------------------------------------

    def on_report(self, st: SignalState, report: ExecutionReport) -> tuple[SignalState, str]:
        """A venue report for one of the signal's orders (or for one of its cancels)."""
        target = st.intent(report.intent_id)
        if target is not None:
            trigger = report_trigger(target, report, self._exe(st).partial_fill_threshold)
        else:
            target = st.cancelled_by(report.intent_id)
            # A venue names the order itself in every other report, so only a refusal of our
            # cancel comes back under the cancel's id.
            if target is None or report.status is not ReportStatus.REJECTED:
                return st, "unknown_intent"
            trigger = Trigger.CANCEL_REFUSED
        event = IntentEvent(trigger, self.env.now, report)
        if trigger is Trigger.PARTIAL_FILL_ENOUGH:
            threshold = self._exe(st).partial_fill_threshold
            event = IntentEvent(
                trigger,
                self.env.now,
                report,
                purpose=CancelPurpose.ACCEPT,
                reason=f"PARTIAL_ACCEPTED: {report.filled_quantity} of {target.intent.quantity} "
                f"filled reaches the {threshold:.0%} threshold, the rest is cancelled",
            )
        st, result = self.drive(st, target.intent.intent_id, event)
        if result.outcome is ReportOutcome.DUPLICATE:
            return st, "duplicate"
        return self.release_due(st), result.outcome.value

    def due_timers(self, st: SignalState) -> SignalState:
        """Fire every timer of the signal that has run out: order timeouts, intervention
        deadlines, then releases (a follow-up due now goes out in the same decision)."""
        now, exe = self.env.now, self._exe(st)
        for iid in [i.intent.intent_id for i in st.intents]:
            it = st.intent(iid)
            if it is None or it.status not in OPEN:
                continue
            due = effective_deadline(it, exe, self.env.listening_since)
            if due is None or due > now:
                continue
            st, _ = self.drive(st, iid, _timeout_event(it, exe, now), audit_type="intent_timeout")
        for iv in st.open_interventions:
            if iv.intervention.timeout_at <= now:
                default = iv.intervention.default_action
                st, _, _ = self.resolve(st, iv.intervention_id, default, None, "timeout")
        return self.release_due(st)

    def release_due(self, st: SignalState) -> SignalState:
        """Release every scheduled intent of the signal whose time has come, or expire it."""
        now, signal = self.env.now, st.signal
        stagger = self.env.config.portfolios[signal.portfolio].stagger
        signal_expired = signal.expires_at is not None and now >= signal.expires_at
        for i in st.intents:
            if i.status is not IntentStatus.SCHEDULED:
                continue
            # An expired signal ends every pending release now, due or not: it can only expire.
            if i.intent.scheduled_at > now and not signal_expired:
                continue
            expiry = expiry_reason(signal, stagger.max_drift_bps, self.env.prices, now)
            iid = i.intent.intent_id
            held = self._held(i.intent.account_id)
            if held is not None and expiry is None:
                # A follow-up decided while the portfolio is halted or its account paused is
                # never sent: the control command's word stands over our own recovery.
                st, _ = self.drive(
                    st,
                    iid,
                    IntentEvent(Trigger.CANCEL, now, reason=held),
                    audit_type="release_cancelled",
                    rationale=f"pending release cancelled: {held}",
                )
                continue
            if expiry is not None:
                st, _ = self.drive(
                    st,
                    iid,
                    IntentEvent(Trigger.EXPIRED, now, reason=expiry),
                    audit_type="intent_expired",
                    rationale=f"not released: {expiry}",
                )
                continue
            it = i.intent.model_copy(update={"released_at": now})
            st = st.with_intent(i.model_copy(update={"intent": it}))
            st, _ = self.drive(
                st,
                iid,
                IntentEvent(Trigger.RELEASE, now),
                audit_type="intent_released",
                rationale=f"released {it.side.value} {it.quantity} {it.symbol} to "
                f"{it.account_id}: {it.rationale}",
                data={
                    "quantity": str(it.quantity),
                    "release_lag_s": round((now - it.scheduled_at).total_seconds(), 6),
                    "intent": it.model_dump(mode="json"),
                },
            )
        return st

    def _held(self, account_id: str) -> str | None:
        if self.env.halted:
            return "HALTED: the portfolio is halted by a control command"
        if account_id in self.env.paused:
            return f"PAUSED: {account_id} is paused by a control command"
        return None

    def cancel_scheduled(
        self, st: SignalState, why: str, account_id: str | None = None
    ) -> SignalState:
        """Cancel releases that have not happened: the venue never saw them, nothing to send."""
        for i in st.intents:
            if i.status is IntentStatus.SCHEDULED and account_id in (None, i.intent.account_id):
                st, _ = self.drive(
                    st,
                    i.intent.intent_id,
                    IntentEvent(Trigger.CANCEL, self.env.now, reason=why),
                    audit_type="release_cancelled",
                    rationale=f"pending release cancelled: {why}",
                )
        return st

    def cancel_signal(
        self, st: SignalState, why: str, reason: str | None = None
    ) -> tuple[SignalState, int]:
        """Cancel everything still open: pending releases, and orders at the venue (a cancel
        intent each); open interventions are closed. The signal ends `cancelled` (with
        `reason`) once its orders are done; a final signal stays as it is (an overfill escalated
        after the end leaves nothing to cancel). Returns the state and the cancels sent."""
        if st.status.terminal:
            return st, 0
        before = len(self.work.intents)
        st = self.cancel_scheduled(st, why)
        for i in st.intents:
            if i.status in AT_VENUE:
                event = IntentEvent(
                    Trigger.CANCEL, self.env.now, purpose=CancelPurpose.OPERATOR, reason=why
                )
                st, _ = self.drive(st, i.intent.intent_id, event)
        for iv in st.open_interventions:
            st = self._close(st, iv, None, "signal", f"the signal was cancelled ({why})")
        st = st.model_copy(
            update={"closing": ResultStatus.CANCELLED, "reason": reason or f"cancelled: {why}"}
        )
        return st, sum(1 for i in self.work.intents[before:] if i.kind is IntentKind.CANCEL)

    # -- new attempts --------------------------------------------------------------------------

    def _attempt(
        self,
        st: SignalState,
        parent: IntentState,
        *,
        kind: IntentKind,
        quantity: Decimal,
        at: datetime,
        recovery: str,
        why: str,
        account: str | None = None,
        broker: str | None = None,
        terms: dict[str, Any] | None = None,
        expired: bool = False,
    ) -> SignalState:
        """Add the next attempt as a new scheduled intent (released by `release_due` when due),
        or as one expired before release when its time would come after the signal's expiry.

        Its id is derived from (signal, account, attempt number on that account, kind), so a
        replayed or redelivered decision makes the very same intent.
        """
        account = account or parent.intent.account_id
        attempt = 1 + max(
            (i.intent.attempt for i in st.intents if i.intent.account_id == account), default=0
        )
        doc = parent.intent.model_dump() | {
            "intent_id": ids.intent_id(st.signal.signal_id, account, attempt, kind.value),
            "account_id": account,
            "broker": broker or parent.intent.broker,
            "quantity": quantity,
            "kind": kind,
            "attempt": attempt,
            "parent_intent_id": parent.intent.intent_id,
            "scheduled_at": at,
            "released_at": at,
            "rationale": why,
            **(terms or {}),
        }
        intent = OrderIntent.model_validate(doc)
        status = IntentStatus.EXPIRED if expired else IntentStatus.SCHEDULED
        new = IntentState(
            intent=intent, status=status, recovery=recovery, reason=why if expired else None
        )
        st = st.model_copy(update={"intents": (*st.intents, new)})
        self._audit(
            "intent_expired" if expired else "intent_scheduled",
            st,
            f"{kind.value} attempt {attempt} of {quantity} {intent.symbol} on {account}"
            + (" not scheduled" if expired else f" at {format_ts(at)}")
            + f": {why}",
            {
                "intent_status": status.value,
                "kind": kind.value,
                "attempt": attempt,
                "parent_intent_id": parent.intent.intent_id,
                "quantity": str(quantity),
                "scheduled_at": format_ts(at),
                "delay_s": round((at - self.env.now).total_seconds(), 6),
                "recovery": recovery,
                "reason": why,
                "intent": intent.model_dump(mode="json"),
            },
            it=new,
        )
        return st

    def _give_up(self, st: SignalState, it: IntentState, why: str) -> SignalState:
        code = it.reason_code.value if it.reason_code else None
        self._audit(
            "recovery_gave_up",
            st,
            f"no further attempt for {it.intent.account_id}: {why}",
            {"reason": why, "reason_code": code},
            it=it,
        )
        return st

    # -- recovery after a reject ---------------------------------------------------------------

    def _recover(self, st: SignalState, it: IntentState) -> SignalState:
        """The order was rejected: classify the reason code, then retry, reduce, reroute, wait
        for the next session, adjust the stops, escalate, or give up with the reason."""
        code = it.reason_code
        remedy = classify(code)
        if code in BREAKER_CODES:
            self._failure(st, it.intent.account_id, it.reason or str(code))
        if st.closing is not None:
            return self._give_up(st, it, f"the signal is being {st.closing.value}")
        if remedy is Remedy.ESCALATE:
            return self._escalate(st, it, code.value if code else "other", it.reason or "rejected")
        inst = self._inst(st)
        remainder = lots_down(it.remaining, inst)
        if remainder < inst.min_quantity:
            return self._give_up(st, it, f"NOTHING_LEFT: {remainder} left < {inst.min_quantity}")
        match remedy:
            case Remedy.RETRY:
                return self._retry(st, it, remainder)
            case Remedy.REDUCE:
                return self._reduce(st, it, remainder)
            case Remedy.REROUTE:
                return self._reroute_suspended(st, it, remainder)
            case Remedy.NEXT_SESSION:
                return self._next_session(st, it, remainder)
            case Remedy.ADJUST_STOPS:
                return self._adjust_stops(st, it, remainder)
        return st  # pragma: no cover - every remedy is matched above

    def _retry(self, st: SignalState, it: IntentState, remainder: Decimal) -> SignalState:
        """Transient: the same account again after exponential backoff with full jitter."""
        exe, account, now = self._exe(st), it.intent.account_id, self.env.now
        used = _recovered(st, it, _TRANSIENT_CODES)
        if used >= exe.retry_max_attempts:
            return self._give_up(st, it, f"RETRIES_EXHAUSTED: {used} retries ({it.reason})")
        if account in self.work.resting(now):
            why = f"{account} is resting ({self.work.health[account].reason})"
            return self._reroute(st, it, remainder, f"{why}: rerouted") or self._give_up(
                st, it, f"ACCOUNT_RESTING: {why}, and no alternative account can take it"
            )
        delay = backoff_s(st.signal.signal_id, account, used + 1, exe.retry_base_s, exe.retry_cap_s)
        ceiling = min(exe.retry_cap_s, exe.retry_base_s * 2.0**used)
        code = it.reason_code.value if it.reason_code else "other"
        return self._attempt(
            st,
            it,
            kind=IntentKind.RETRY,
            quantity=remainder,
            at=now + timedelta(seconds=delay),
            recovery=code,
            why=f"{code}: retry {used + 1} of {exe.retry_max_attempts} on {account} after "
            f"{delay:.3f}s (full jitter in 0-{ceiling:g}s)",
        )

    def _reduce(self, st: SignalState, it: IntentState, remainder: Decimal) -> SignalState:
        """Not enough margin: the same account, a share of the remainder."""
        exe, inst = self._exe(st), self._inst(st)
        used = _used(st, it, frozenset({IntentKind.REDUCED}))
        if used >= exe.max_reduce_attempts:
            return self._give_up(st, it, f"REDUCE_EXHAUSTED: reduced {used} times ({it.reason})")
        smaller = lots_down(remainder * Decimal(str(exe.reduce_share)), inst)
        if smaller < inst.min_quantity:
            return self._give_up(
                st, it, f"REDUCED_BELOW_MINIMUM: {smaller} < {inst.min_quantity} ({it.reason})"
            )
        return self._attempt(
            st,
            it,
            kind=IntentKind.REDUCED,
            quantity=smaller,
            at=self.env.now,
            recovery="insufficient_margin",
            why=f"insufficient_margin: reduced to {exe.reduce_share:g} x {remainder} = {smaller}, "
            f"attempt {used + 1} of {exe.max_reduce_attempts}",
        )

    def _reroute_suspended(
        self, st: SignalState, it: IntentState, remainder: Decimal
    ) -> SignalState:
        """The account is suspended: it rests for the cooldown, the remainder goes elsewhere."""
        account = it.intent.account_id
        self._suspend(st, account, it.reason or "account_suspended")
        return self._reroute(st, it, remainder, f"{account} is suspended: rerouted") or (
            self._give_up(st, it, f"NO_ALTERNATIVE: {account} is suspended, no account can take it")
        )

    def _next_session(self, st: SignalState, it: IntentState, remainder: Decimal) -> SignalState:
        """The market is closed: again when the instrument's next session opens, unless the
        signal expires first (then the attempt is recorded as expired, never released)."""
        exe, inst, symbol = self._exe(st), self._inst(st), st.signal.symbol
        if inst.sessions is None:
            return self._give_up(st, it, f"MARKET_CLOSED: no session calendar for {symbol}")
        used = _recovered(st, it, frozenset({"market_closed"}))
        if used >= exe.retry_max_attempts:
            return self._give_up(st, it, f"MARKET_CLOSED: retried at {used} sessions already")
        opens = next_session_open(inst.sessions, self.env.now)
        if opens is None:
            return self._give_up(st, it, f"MARKET_CLOSED: no session of {symbol} within a week")
        expires = st.signal.expires_at
        why = f"market_closed: {symbol} opens next at {format_ts(opens)}"
        expired = expires is not None and opens >= expires
        if expires is not None and expired:
            why = f"EXPIRED: {why}, after the signal expires at {format_ts(expires)}"
        return self._attempt(
            st,
            it,
            kind=IntentKind.RETRY,
            quantity=remainder,
            at=opens,
            recovery="market_closed",
            why=why,
            expired=expired,
        )

    def _adjust_stops(self, st: SignalState, it: IntentState, remainder: Decimal) -> SignalState:
        """The stops are too close: once, at the instrument's minimum distance, sized down so
        the order risks no more than before; a second invalid_stops gives up."""
        inst = self._inst(st)
        if _recovered(st, it, frozenset({"invalid_stops"})):
            return self._give_up(st, it, f"INVALID_STOPS: adjusted once already ({it.reason})")
        adjusted = adjusted_stop(
            it.intent.model_copy(update={"quantity": remainder}),
            inst,
            self.env.prices.get(st.signal.symbol),
        )
        if adjusted is None:
            return self._give_up(
                st,
                it,
                f"INVALID_STOPS: nothing to adjust with min_stop_distance="
                f"{inst.min_stop_distance} ({it.reason})",
            )
        stop, quantity = adjusted
        return self._attempt(
            st,
            it,
            kind=IntentKind.RETRY,
            quantity=quantity,
            at=self.env.now,
            recovery="invalid_stops",
            why=f"invalid_stops: stop {it.intent.stop_loss} -> {stop} (min distance "
            f"{inst.min_stop_distance}), quantity {remainder} -> {quantity} to risk no more",
            terms={"stop_loss": stop},
        )

    # -- completing a partial fill -------------------------------------------------------------

    def _follow_up(self, st: SignalState, it: IntentState) -> SignalState:
        """The venue ended an order we asked to cancel: do what the cancel was for."""
        if it.cancel_purpose is CancelPurpose.COMPLETE:
            return self._complete(st, it)
        if it.cancel_purpose is CancelPurpose.ACCEPT:
            return self._accept_partial(st, it, "the rest was cancelled")
        return st

    def _accept_partial(self, st: SignalState, it: IntentState, why: str) -> SignalState:
        self._audit(
            "partial_accepted",
            st,
            f"kept {it.filled} of {it.intent.quantity} on {it.intent.account_id}: {why}",
            {
                "filled_quantity": str(it.filled),
                "quantity": str(it.intent.quantity),
                "reason": why,
            },
            it=it,
        )
        return st

    def _complete(self, st: SignalState, it: IntentState) -> SignalState:
        """Complete a cancelled remainder: re-price a limit toward the market if a price is
        known and the signal allows it, else reroute it to the best alternative account (its
        rules re-checked now), else accept the partial."""
        signal, exe, inst = st.signal, self._exe(st), self._inst(st)
        remainder = lots_down(it.remaining, inst)
        if st.closing is not None:
            return self._accept_partial(st, it, f"the signal is being {st.closing.value}")
        if remainder < inst.min_quantity:
            return self._accept_partial(st, it, f"the {remainder} left is below the minimum")
        used = _used(st, it, _FOLLOW_KINDS)
        if used >= exe.max_completion_attempts:
            return self._accept_partial(
                st, it, f"{used} of {exe.max_completion_attempts} completion attempts used"
            )
        market = self.env.prices.get(signal.symbol)
        no_reprice = "a market order"
        if it.intent.order_type is OrderType.LIMIT:
            limit = repriced_limit(signal, it.intent.limit_price, market, exe.max_reprice_bps)
            if limit is not None:
                return self._attempt(
                    st,
                    it,
                    kind=IntentKind.COMPLETION,
                    quantity=remainder,
                    at=self.env.now,
                    recovery="partial_fill",
                    why=f"completion {used + 1} of {exe.max_completion_attempts}: {remainder} "
                    f"re-priced {it.intent.limit_price} -> {limit} toward the market at "
                    f"{market} (at most {exe.max_reprice_bps:g} bps from the signal's "
                    f"{signal.limit_price})",
                    terms={"limit_price": limit},
                )
            no_reprice = (
                "no market price known"
                if market is None
                else f"no room toward {market} within {exe.max_reprice_bps:g} bps"
            )
        why = f"completion {used + 1} of {exe.max_completion_attempts}: remainder rerouted"
        rerouted = self._reroute(st, it, remainder, why, recovery="partial_fill")
        if rerouted is not None:
            return rerouted
        return self._accept_partial(
            st, it, f"not re-priced ({no_reprice}) and no alternative account"
        )

    # -- rerouting -----------------------------------------------------------------------------

    def recheck(
        self, signal: Signal, account: str, quantity: Decimal
    ) -> tuple[Allocation | None, tuple[str, ...]]:
        """Can `account` take `quantity` of the signal now? Its rules are re-checked by planning
        the quantity with every other account paused: (allocation, ()) or (None, reasons)."""
        cfg = self.env.config.accounts.get(account)
        if cfg is None or cfg.portfolio != signal.portfolio:
            return None, (f"UNKNOWN_ACCOUNT: {account} is not in portfolio {signal.portfolio}",)
        others = frozenset(self.env.config.accounts_of(signal.portfolio)) - {account}
        plan = plan_signal(
            signal.model_copy(update={"quantity": quantity}),
            self.env.accounts,
            self.env.config,
            PlanContext(
                paused_accounts=others | (self.env.paused & {account}),
                now=self.env.now,
                cooldown_accounts=self.work.resting(self.env.now) & {account},
            ),
        )
        allocation = next((a for a in plan.allocations if a.account_id == account), None)
        if allocation is not None:
            return allocation, ()
        reasons = next((e.reasons for e in plan.exclusions if e.account_id == account), None)
        return None, reasons or (plan.rejected_reason or "NOT_ALLOCATED",)

    def pick_alternative(
        self, st: SignalState, quantity: Decimal, prefer: str | None = None
    ) -> tuple[Allocation | None, list[tuple[str, tuple[str, ...]]]]:
        """The first candidate (the named account, else the plan's ranked alternatives not yet
        used by the signal) whose rules take the quantity now, and every refusal before it."""
        if prefer is not None:
            candidates = [prefer]
        else:
            used = {i.intent.account_id for i in st.intents}
            candidates = [a for a in st.plan.alternatives if a not in used]
        refused: list[tuple[str, tuple[str, ...]]] = []
        for account in candidates:
            allocation, reasons = self.recheck(st.signal, account, quantity)
            if allocation is not None:
                return allocation, refused
            refused.append((account, reasons))
        return None, refused

    def _reroute(
        self,
        st: SignalState,
        it: IntentState,
        quantity: Decimal,
        why: str,
        *,
        prefer: str | None = None,
        recovery: str | None = None,
    ) -> SignalState | None:
        """Send `quantity` to an alternative account as a `reroute` intent; None if none can."""
        exe = self._exe(st)
        used = _used(st, it, _FOLLOW_KINDS)
        if used >= exe.max_completion_attempts:
            self._audit(
                "reroute_refused",
                st,
                f"no reroute: {used} of {exe.max_completion_attempts} completion attempts used",
                {"reason": "COMPLETION_ATTEMPTS_EXHAUSTED"},
                it=it,
            )
            return None
        allocation, refused = self.pick_alternative(st, quantity, prefer)
        for account, reasons in refused:
            self._audit(
                "alternative_refused",
                st,
                f"{account} cannot take {quantity} now: " + "; ".join(reasons),
                {"reasons": list(reasons), "quantity": str(quantity)},
                account_id=account,
            )
        if allocation is None:
            return None
        return self._attempt(
            st,
            it,
            kind=IntentKind.REROUTE,
            quantity=allocation.quantity,
            at=self.env.now,
            recovery=recovery or (it.reason_code.value if it.reason_code else "reroute"),
            why=f"{why} to {allocation.account_id} ({allocation.quantity} of {quantity}, "
            f"re-checked now: {allocation.rationale})",
            account=allocation.account_id,
            broker=allocation.broker,
        )

    # -- accounts: circuit breaker and suspension ----------------------------------------------

    def _failure(self, st: SignalState, account: str, why: str) -> None:
        exe = self._exe(st)
        before = self.work.health.get(account, AccountHealth())
        health, opened = record_failure(before, self.env.now, exe, why)
        self.work.health[account] = health
        if opened and health.breaker_until is not None:
            self._audit(
                "circuit_opened",
                st,
                f"{account} left out of planning until {format_ts(health.breaker_until)}: "
                f"{exe.breaker_failures} failures within {exe.breaker_window_s:g}s, the last: "
                f"{why}",
                {
                    "failures": exe.breaker_failures,
                    "window_s": exe.breaker_window_s,
                    "until": format_ts(health.breaker_until),
                    "reason": why,
                },
                account_id=account,
            )

    def _suspend(self, st: SignalState, account: str, why: str) -> None:
        before = self.work.health.get(account, AccountHealth())
        health = suspend(before, self.env.now, self._exe(st), why)
        self.work.health[account] = health
        until = format_ts(health.suspended_until) if health.suspended_until else "?"
        self._audit(
            "account_cooldown_started",
            st,
            f"{account} left out of planning and reroutes until {until}: {why}",
            {"until": until, "reason": why},
            account_id=account,
        )

    # -- escalation ----------------------------------------------------------------------------

    def _escalate(self, st: SignalState, it: IntentState, code: str, reason: str) -> SignalState:
        exe = self._exe(st)
        earlier = sum(
            1
            for x in st.interventions
            if x.intervention.intent_id == it.intent.intent_id
            and x.intervention.reason_code == code
        )
        iv = new_intervention(
            signal_id=st.signal.signal_id,
            portfolio=st.signal.portfolio,
            intent_id=it.intent.intent_id,
            account_id=it.intent.account_id,
            reason_code=code,
            reason=reason,
            now=self.env.now,
            timeout_s=exe.intervention_timeout_s,
            configured_default=exe.intervention_default_action,
            earlier=earlier,
        )
        self.work.interventions.append(iv)
        self._audit(
            "intervention_opened",
            st,
            f"needs a human ({code}) on {it.intent.account_id}: {reason}; options "
            f"{', '.join(a.value for a in iv.options)}, default {iv.default_action.value} at "
            f"{format_ts(iv.timeout_at)}",
            {"intervention": iv.model_dump(mode="json")},
            it=it,
        )
        opened = InterventionState(intervention=iv)
        return st.model_copy(update={"interventions": (*st.interventions, opened)})

    def _overfill(self, st: SignalState, it: IntentState, event: IntentEvent) -> SignalState:
        reported = event.report.filled_quantity if event.report is not None else it.filled
        why = f"venue reports {reported} filled for an order of {it.intent.quantity}"
        self._audit(
            "overfill_detected",
            st,
            f"OVERFILL: {why}",
            {"filled_quantity": str(reported), "quantity": str(it.intent.quantity)},
            it=it,
        )
        return self._escalate(st, it, OVERFILL, why)

    def _late_fill(self, st: SignalState, it: IntentState, event: IntentEvent) -> SignalState:
        what = event.report.status.value if event.report is not None else event.trigger.value
        why = (
            f"a {what} report brought the fills to {it.filled} after the order was "
            f"{it.status.value}"
        )
        self._audit(
            "late_fill_detected",
            st,
            f"LATE_FILL: {why}; counted",
            {"filled_quantity": str(it.filled), "intent_status": it.status.value},
            it=it,
        )
        return self._escalate(st, it, LATE_FILL, why)

    def _settle(self, st: SignalState, it: IntentState, note: str) -> SignalState:
        """The venue answered after all: its unknown-outcome intervention is moot."""
        for iv in st.open_interventions:
            ours = iv.intervention.intent_id == it.intent.intent_id
            if ours and iv.intervention.reason_code == UNKNOWN_OUTCOME:
                st = self._close(st, iv, None, "venue", f"settled: {note}")
        return st

    def _close(
        self,
        st: SignalState,
        iv: InterventionState,
        action: InterventionAction | None,
        by: str,
        note: str,
    ) -> SignalState:
        done = resolved(iv, action, by, self.env.now, note)
        what = f"resolved with {action.value} by {by}" if action is not None else "closed"
        self._audit(
            "intervention_resolved",
            st,
            f"intervention {iv.intervention_id} ({iv.intervention.reason_code}) {what}; {note}",
            {
                "intervention_id": iv.intervention_id,
                "reason_code": iv.intervention.reason_code,
                "action": action.value if action is not None else None,
                "resolved_by": by,
                "note": note,
            },
            it=st.intent(iv.intervention.intent_id or ""),
            account_id=iv.intervention.account_id,
        )
        kept = tuple(
            done if x.intervention_id == iv.intervention_id else x for x in st.interventions
        )
        return st.model_copy(update={"interventions": kept})

    def resolve(
        self,
        st: SignalState,
        intervention_id: str,
        action: InterventionAction,
        reroute_to: str | None,
        by: str,
    ) -> tuple[SignalState, str, str]:
        """Resolve an intervention with an action; returns (state, outcome, rationale).

        An operator's action that cannot be carried out now (a retry past its bound, a reroute
        no account can take) is refused and the intervention stays open. At the timeout (`by`
        is "timeout") such a default falls back to accepting the partial, so every signal ends.
        """
        iv = next((x for x in st.interventions if x.intervention_id == intervention_id), None)
        if iv is None:
            return st, "unknown_target", f"no intervention {intervention_id}"
        if not iv.open:
            return st, "no_op", f"intervention {intervention_id} is already closed ({iv.note})"
        if action not in iv.intervention.options:
            opts = ", ".join(a.value for a in iv.intervention.options)
            return st, "refused", f"{action.value} is not an option here ({opts})"
        target = st.intent(iv.intervention.intent_id or "")
        assert target is not None  # an intervention always names one of the signal's intents
        remainder = lots_down(target.remaining, self._inst(st))
        blocked = self._blocked(st, target, action, remainder, reroute_to)
        note = ""
        if blocked is not None:
            if by != "timeout":
                return st, "refused", f"{action.value} refused: {blocked}"
            note = f"; default {action.value} not possible ({blocked}): accept_partial instead"
            action = A.ACCEPT_PARTIAL
        st = self._close(st, iv, action, by, f"{action.value}{note}")
        why = f"intervention {action.value} by {by}"
        if target.status is IntentStatus.UNKNOWN:
            event = IntentEvent(Trigger.RESOLVED, self.env.now, reason=why)
            st, _ = self.drive(st, target.intent.intent_id, event)
        st = self._carry_out(
            st, target.intent.intent_id, action, remainder, reroute_to=reroute_to, why=why
        )
        st = self.release_due(st)
        return st, "applied", f"intervention {intervention_id} resolved with {action.value}{note}"

    def _carry_out(
        self,
        st: SignalState,
        intent_id: str,
        action: InterventionAction,
        remainder: Decimal,
        *,
        reroute_to: str | None,
        why: str,
    ) -> SignalState:
        target = st.intent(intent_id)
        assert target is not None
        match action:
            case A.RETRY:
                return self._attempt(
                    st,
                    target,
                    kind=IntentKind.RETRY,
                    quantity=remainder,
                    at=self.env.now,
                    recovery="intervention",
                    why=f"{why}: {remainder} again on {target.intent.account_id}, new id",
                )
            case A.REROUTE:
                rerouted = self._reroute(
                    st, target, remainder, why, prefer=reroute_to, recovery="intervention"
                )
                return rerouted or self._accept_partial(st, target, "no account could take it")
            case A.ACCEPT_PARTIAL:
                if target.status in AT_VENUE and target.status is not IntentStatus.CANCEL_REQUESTED:
                    event = IntentEvent(
                        Trigger.CANCEL, self.env.now, purpose=CancelPurpose.ACCEPT, reason=why
                    )
                    return self.drive(st, intent_id, event)[0]
                return self._accept_partial(st, target, why)
            case A.CANCEL:
                return self.cancel_signal(st, why)[0]
        return st  # pragma: no cover - every action is matched above

    def _blocked(
        self,
        st: SignalState,
        target: IntentState,
        action: InterventionAction,
        remainder: Decimal,
        reroute_to: str | None,
    ) -> str | None:
        """Why `action` cannot be carried out now, or None."""
        if action not in (A.RETRY, A.REROUTE):
            return None
        if st.closing is not None or st.status.terminal:
            return f"the signal is {(st.closing or st.status).value}"
        exe, inst = self._exe(st), self._inst(st)
        if remainder < inst.min_quantity:
            return f"nothing left to send ({remainder} < {inst.min_quantity})"
        if action is A.RETRY:
            used = _used(st, target, frozenset({IntentKind.RETRY}))
            if used >= exe.retry_max_attempts:
                return f"RETRIES_EXHAUSTED: {used} retries of this order already"
            if target.intent.account_id in self.work.resting(self.env.now):
                return f"{target.intent.account_id} is resting"
            return None
        used = _used(st, target, _FOLLOW_KINDS)
        if used >= exe.max_completion_attempts:
            return f"COMPLETION_ATTEMPTS_EXHAUSTED: {used} reroutes and completions already"
        allocation, refused = self.pick_alternative(st, remainder, reroute_to)
        if allocation is None:
            details = "; ".join(f"{a}: {', '.join(r)}" for a, r in refused)
            return "no account can take it now" + (f" ({details})" if details else "")
        return None
