"""Following one order intent to a terminal state, and aggregating a signal's result.

The intent state machine is one literal table, `(state, trigger) -> (state, effects)`, read top
to bottom like NautilusTrader's order FSM. Triggers are what happened (a venue report, a timer, a
control command); effects are what must follow (publish the intent, send a cancel, arm a timer,
recover from a reject, escalate to a human). `step` applies one trigger and *returns* the
effects: nothing is performed here. The decider (`execution`) turns effects into intents,
interventions and audit events.

A pair the table does not name is not an error: a venue may deliver reports late, twice or out
of order, so the trigger is kept as a counted no-op (`OUT_OF_ORDER`), its fills still counted.
Terminal states absorb every trigger; a fill reported after one is still counted (it is a real
position) and flagged, never hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any

from orch_worker.domain.immutable import Immutable
from orch_worker.domain.interventions import InterventionState
from orch_worker.domain.models import (
    ExecutionReport,
    ExecutionResult,
    IntentKind,
    OrderIntent,
    OrderType,
    ReasonCode,
    ReportStatus,
    ResultLine,
    ResultStatus,
    Signal,
)
from orch_worker.domain.plan import Plan


class IntentStatus(StrEnum):
    SCHEDULED = "scheduled"
    """Planned, waiting for its release time; the venue has not seen it."""
    RELEASED = "released"
    ACCEPTED = "accepted"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    CANCEL_REQUESTED = "cancel_requested"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    EXPIRED = "expired"
    FAILED = "failed"
    """Given up without a venue verdict (its outcome was unknown and a human or the
    intervention timeout decided)."""
    UNKNOWN = "unknown"
    """Released (or cancelling) and the venue went quiet past the acknowledgement timeout: an
    intervention is open. Never re-sent blindly; a late report still moves it on."""


TERMINAL = frozenset(
    {
        IntentStatus.FILLED,
        IntentStatus.CANCELLED,
        IntentStatus.REJECTED,
        IntentStatus.EXPIRED,
        IntentStatus.FAILED,
    }
)
OPEN = frozenset(IntentStatus) - TERMINAL
AT_VENUE = frozenset(
    {
        IntentStatus.RELEASED,
        IntentStatus.ACCEPTED,
        IntentStatus.PARTIALLY_FILLED,
        IntentStatus.CANCEL_REQUESTED,
        IntentStatus.UNKNOWN,
    }
)
"""Open states in which the venue may hold a live order."""


class Trigger(StrEnum):
    """What happened to an intent. Reports are past tense; commands are imperative."""

    RELEASE = "release"
    """Its release time came (and no expiry or drift check stopped it)."""
    ACCEPTED = "accepted"
    PARTIAL_FILL = "partial_fill"
    PARTIAL_FILL_ENOUGH = "partial_fill_enough"
    """A limit order's partial fill reaching the portfolio's accept threshold."""
    FILL = "fill"
    REJECT = "reject"
    CANCEL_CONFIRMED = "cancel_confirmed"
    EXPIRED = "expired"
    """The venue expired it, or it expired (or drifted) before its release."""
    TIMEOUT = "timeout"
    """Its timer ran out: no acknowledgement (released, cancelling) or no completion."""
    CANCEL = "cancel"
    """Cancel it: a control command, a pause or halt, or a decision to accept a partial."""
    CANCEL_REFUSED = "cancel_refused"
    """The venue refused our cancel: the order is not open there."""
    RESOLVED = "resolved"
    """An operator (or the intervention timeout) decided what to do with an unknown outcome."""


class Effect(StrEnum):
    """What must follow a transition; returned by `step`, performed by the decider."""

    PUBLISH = "publish"
    """Send the intent to the venue (order-intents topic)."""
    SEND_CANCEL = "send_cancel"
    """Send a cancel intent naming this order."""
    ARM_ACK_TIMER = "arm_ack_timer"
    """Expect a venue report within the acknowledgement timeout."""
    ARM_COMPLETION_TIMER = "arm_completion_timer"
    """Expect the order done within the completion timeout."""
    RECOVER = "recover"
    """Classify the reject and schedule the next attempt, or give up, or escalate."""
    FOLLOW_UP = "follow_up"
    """The order ended after our cancel: do what the cancel was for (complete the remainder)."""
    ESCALATE = "escalate"
    """Open an Intervention: the outcome is unknown."""
    SETTLE_ESCALATION = "settle_escalation"
    """The venue spoke after all: an open intervention about this order is moot."""


S, T, E = IntentStatus, Trigger, Effect
_CANCEL = (E.SEND_CANCEL, E.ARM_ACK_TIMER)

TRANSITIONS: dict[tuple[IntentStatus, Trigger], tuple[IntentStatus, tuple[Effect, ...]]] = {
    # scheduled: not at the venue yet
    (S.SCHEDULED, T.RELEASE): (S.RELEASED, (E.PUBLISH, E.ARM_ACK_TIMER)),
    (S.SCHEDULED, T.EXPIRED): (S.EXPIRED, ()),  # expired or drifted before release: none sent
    (S.SCHEDULED, T.CANCEL): (S.CANCELLED, ()),  # never sent, so nothing to cancel there
    # released: sent, no word yet
    (S.RELEASED, T.ACCEPTED): (S.ACCEPTED, (E.ARM_COMPLETION_TIMER,)),
    (S.RELEASED, T.PARTIAL_FILL): (S.PARTIALLY_FILLED, (E.ARM_COMPLETION_TIMER,)),  # accept lost
    (S.RELEASED, T.PARTIAL_FILL_ENOUGH): (S.CANCEL_REQUESTED, _CANCEL),
    (S.RELEASED, T.FILL): (S.FILLED, ()),
    (S.RELEASED, T.REJECT): (S.REJECTED, (E.RECOVER,)),
    (S.RELEASED, T.CANCEL_CONFIRMED): (S.CANCELLED, ()),  # the venue's own (an IOC's rest)
    (S.RELEASED, T.EXPIRED): (S.EXPIRED, ()),
    (S.RELEASED, T.TIMEOUT): (S.UNKNOWN, (E.ESCALATE,)),  # no ack: never re-send blindly
    (S.RELEASED, T.CANCEL): (S.CANCEL_REQUESTED, _CANCEL),
    # accepted: working at the venue
    (S.ACCEPTED, T.ACCEPTED): (S.ACCEPTED, ()),
    (S.ACCEPTED, T.PARTIAL_FILL): (S.PARTIALLY_FILLED, ()),  # the completion clock keeps running
    (S.ACCEPTED, T.PARTIAL_FILL_ENOUGH): (S.CANCEL_REQUESTED, _CANCEL),
    (S.ACCEPTED, T.FILL): (S.FILLED, ()),
    (S.ACCEPTED, T.REJECT): (S.REJECTED, (E.RECOVER,)),
    (S.ACCEPTED, T.CANCEL_CONFIRMED): (S.CANCELLED, ()),
    (S.ACCEPTED, T.EXPIRED): (S.EXPIRED, ()),
    (S.ACCEPTED, T.TIMEOUT): (S.CANCEL_REQUESTED, _CANCEL),  # not done in time: complete it
    (S.ACCEPTED, T.CANCEL): (S.CANCEL_REQUESTED, _CANCEL),
    # partially filled
    (S.PARTIALLY_FILLED, T.ACCEPTED): (S.PARTIALLY_FILLED, ()),  # a late accept changes nothing
    (S.PARTIALLY_FILLED, T.PARTIAL_FILL): (S.PARTIALLY_FILLED, ()),
    (S.PARTIALLY_FILLED, T.PARTIAL_FILL_ENOUGH): (S.CANCEL_REQUESTED, _CANCEL),
    (S.PARTIALLY_FILLED, T.FILL): (S.FILLED, ()),
    (S.PARTIALLY_FILLED, T.REJECT): (S.REJECTED, (E.RECOVER,)),  # the rest refused; fills stand
    (S.PARTIALLY_FILLED, T.CANCEL_CONFIRMED): (S.CANCELLED, ()),
    (S.PARTIALLY_FILLED, T.EXPIRED): (S.EXPIRED, ()),
    (S.PARTIALLY_FILLED, T.TIMEOUT): (S.CANCEL_REQUESTED, _CANCEL),
    (S.PARTIALLY_FILLED, T.CANCEL): (S.CANCEL_REQUESTED, _CANCEL),
    # cancel requested: waiting for the venue to end the order
    (S.CANCEL_REQUESTED, T.ACCEPTED): (S.CANCEL_REQUESTED, ()),
    (S.CANCEL_REQUESTED, T.PARTIAL_FILL): (S.CANCEL_REQUESTED, ()),  # fills race the cancel
    (S.CANCEL_REQUESTED, T.PARTIAL_FILL_ENOUGH): (S.CANCEL_REQUESTED, ()),
    (S.CANCEL_REQUESTED, T.FILL): (S.FILLED, ()),  # filled before the cancel landed
    (S.CANCEL_REQUESTED, T.REJECT): (S.REJECTED, (E.FOLLOW_UP,)),
    (S.CANCEL_REQUESTED, T.CANCEL_CONFIRMED): (S.CANCELLED, (E.FOLLOW_UP,)),
    (S.CANCEL_REQUESTED, T.EXPIRED): (S.EXPIRED, (E.FOLLOW_UP,)),
    (S.CANCEL_REQUESTED, T.TIMEOUT): (S.UNKNOWN, (E.ESCALATE,)),  # the cancel went unanswered
    (S.CANCEL_REQUESTED, T.CANCEL): (S.CANCEL_REQUESTED, ()),  # asked once is enough
    # refused: not open there, so its final report is on its way (else the timer escalates)
    (S.CANCEL_REQUESTED, T.CANCEL_REFUSED): (S.CANCEL_REQUESTED, ()),
    # unknown: an intervention is open; any word from the venue settles it
    (S.UNKNOWN, T.ACCEPTED): (S.ACCEPTED, (E.SETTLE_ESCALATION, E.ARM_COMPLETION_TIMER)),
    (S.UNKNOWN, T.PARTIAL_FILL): (
        S.PARTIALLY_FILLED,
        (E.SETTLE_ESCALATION, E.ARM_COMPLETION_TIMER),
    ),
    (S.UNKNOWN, T.PARTIAL_FILL_ENOUGH): (S.CANCEL_REQUESTED, (E.SETTLE_ESCALATION, *_CANCEL)),
    (S.UNKNOWN, T.FILL): (S.FILLED, (E.SETTLE_ESCALATION,)),
    (S.UNKNOWN, T.REJECT): (S.REJECTED, (E.SETTLE_ESCALATION, E.RECOVER)),
    (S.UNKNOWN, T.CANCEL_CONFIRMED): (S.CANCELLED, (E.SETTLE_ESCALATION, E.FOLLOW_UP)),
    (S.UNKNOWN, T.EXPIRED): (S.EXPIRED, (E.SETTLE_ESCALATION,)),
    (S.UNKNOWN, T.CANCEL_REFUSED): (S.UNKNOWN, ()),  # still no word on the order itself
    # cancel whatever may be there and stop following: a stray fill is still counted, flagged
    (S.UNKNOWN, T.CANCEL): (S.FAILED, (E.SETTLE_ESCALATION, E.SEND_CANCEL)),
    (S.UNKNOWN, T.RESOLVED): (S.FAILED, (E.SEND_CANCEL,)),
}
"""Every allowed transition. A pair missing here is refused as out of order (a no-op)."""

REPORT_TRIGGERS: dict[ReportStatus, Trigger] = {
    ReportStatus.ACCEPTED: T.ACCEPTED,
    ReportStatus.PARTIALLY_FILLED: T.PARTIAL_FILL,
    ReportStatus.FILLED: T.FILL,
    ReportStatus.REJECTED: T.REJECT,
    ReportStatus.CANCELLED: T.CANCEL_CONFIRMED,
    ReportStatus.EXPIRED: T.EXPIRED,
}


class CancelPurpose(StrEnum):
    """Why a cancel was sent: what follows once the venue has ended the order."""

    ACCEPT = "accept"
    """Keep what filled; nothing follows (threshold reached, attempts used up, an operator)."""
    COMPLETE = "complete"
    """Complete the remainder: re-price it, reroute it, or else accept the partial."""
    OPERATOR = "operator"
    """A control command asked; nothing follows."""


class Frozen(Immutable):
    """The coordinator's state models: immutable, so a decision returns new state."""


class IntentState(Frozen):
    intent: OrderIntent
    status: IntentStatus
    filled: Decimal = Decimal(0)
    notional: Decimal = Decimal(0)
    report_ids: tuple[str, ...] = ()
    order_id: str | None = None
    reason: str | None = None
    reason_code: ReasonCode | None = None
    overfilled: bool = False
    late_fill: bool = False
    """A fill was reported after the intent was terminal (counted, flagged, escalated)."""
    deadline: datetime | None = None
    """When its timer runs out (ack or completion); None when no timer is armed."""
    cancel_purpose: CancelPurpose | None = None
    cancel_ids: tuple[str, ...] = ()
    """Ids of the cancel intents sent for this order (their refusals are routed back here)."""
    recovery: str | None = None
    """Why this attempt exists: the reject reason it recovers from, `partial_fill`, or
    `intervention`; None for an initial intent."""

    @property
    def avg_price(self) -> Decimal | None:
        return (self.notional / self.filled).quantize(Decimal("1e-8")) if self.filled else None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def remaining(self) -> Decimal:
        return max(self.intent.quantity - self.filled, Decimal(0))


class ReportOutcome(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out_of_order"
    """The table has no row for (state, trigger): kept as a counted no-op."""
    LATE = "late"
    """The intent was already terminal: its state is kept (a higher fill is still counted)."""


@dataclass(frozen=True, slots=True)
class IntentEvent:
    """One trigger for one intent, with what came with it."""

    trigger: Trigger
    at: datetime
    report: ExecutionReport | None = None
    purpose: CancelPurpose | None = None
    """For triggers whose row sends a cancel: what follows it (default OPERATOR)."""
    reason: str | None = None
    """Why, for triggers without a report (a timeout, an expiry, a command)."""


@dataclass(frozen=True, slots=True)
class Timing:
    ack_timeout_s: float = 30.0
    completion_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class Step:
    """One applied trigger: the new state, what happened, and what must follow."""

    state: IntentState
    outcome: ReportOutcome
    fill_delta: Decimal
    effects: tuple[Effect, ...] = ()
    before: IntentStatus | None = None


ReportApplied = Step
"""The result of `apply_report` (a `Step`)."""


def transition(status: IntentStatus, trigger: Trigger) -> tuple[IntentStatus, tuple[Effect, ...]]:
    """The table's row for (status, trigger); raises `InvalidTransitionError` naming both."""
    row = TRANSITIONS.get((status, trigger))
    if row is None:
        raise InvalidTransitionError(status, trigger)
    return row


class InvalidTransitionError(ValueError):
    def __init__(self, status: IntentStatus, trigger: Trigger) -> None:
        super().__init__(f"{status.value.upper()} -> {trigger.value.upper()}")
        self.status, self.trigger = status, trigger


def _report_update(
    state: IntentState, report: ExecutionReport
) -> tuple[dict[str, object], Decimal]:
    """Fills (cumulative, so only an increase counts), ids and reason from a venue report."""
    update: dict[str, object] = {"report_ids": (*state.report_ids, report.report_id)}
    increase = report.filled_quantity - state.filled
    delta = increase if increase > 0 else Decimal(0)
    # The report model guarantees a price whenever anything is filled.
    price = report.last_price if report.last_price is not None else report.avg_price
    if delta > 0:
        update |= {
            "filled": state.filled + delta,
            "notional": state.notional + delta * (price or Decimal(0)),
        }
    if report.filled_quantity > state.intent.quantity:
        update["overfilled"] = True
    if report.order_id:
        update["order_id"] = report.order_id
    if report.reason_code is not None:
        update["reason"] = f"{report.reason_code.value}: {report.reason_text or ''}".strip()
        update["reason_code"] = report.reason_code
    return update, delta


def step(state: IntentState, event: IntentEvent, timing: Timing | None = None) -> Step:
    """Apply one trigger to one intent; the same report twice is the same as once.

    Timers are part of the state: a row that arms one sets `deadline` (from `event.at` and
    `timing`; without `timing` no timer is armed), a terminal or unknown state clears it, and
    every other row keeps it (a partial fill does not restart the completion clock).
    """
    report = event.report
    if report is not None and report.report_id in state.report_ids:
        return Step(state, ReportOutcome.DUPLICATE, Decimal(0), before=state.status)
    update: dict[str, object] = {}
    delta = Decimal(0)
    if report is not None:
        if event.trigger is T.CANCEL_REFUSED:  # a report about our cancel, not the order
            update["report_ids"] = (*state.report_ids, report.report_id)
        else:
            update, delta = _report_update(state, report)
    if state.terminal:
        if delta > 0:
            update["late_fill"] = True
        return Step(state.model_copy(update=update), ReportOutcome.LATE, delta, before=state.status)
    row = TRANSITIONS.get((state.status, event.trigger))
    if row is None:
        return Step(
            state.model_copy(update=update), ReportOutcome.OUT_OF_ORDER, delta, before=state.status
        )
    target, effects = row
    update["status"] = target
    if target in TERMINAL or target is S.UNKNOWN:
        update["deadline"] = None
    elif timing is not None and E.ARM_ACK_TIMER in effects:
        update["deadline"] = event.at + timedelta(seconds=timing.ack_timeout_s)
    elif timing is not None and E.ARM_COMPLETION_TIMER in effects:
        update["deadline"] = event.at + timedelta(seconds=timing.completion_timeout_s)
    if E.SEND_CANCEL in effects:
        update["cancel_purpose"] = event.purpose or CancelPurpose.OPERATOR
    if event.reason is not None and report is None and target is not state.status:
        update["reason"] = event.reason
    return Step(
        state.model_copy(update=update), ReportOutcome.APPLIED, delta, effects, state.status
    )


def report_trigger(
    state: IntentState, report: ExecutionReport, threshold: float | None = None
) -> Trigger:
    """The trigger a venue report is: a limit order's partial fill at or above the accept
    threshold is `PARTIAL_FILL_ENOUGH` (a market order's rest normally fills at once, so it waits
    for the completion timeout instead)."""
    trigger = REPORT_TRIGGERS[report.status]
    if (
        trigger is T.PARTIAL_FILL
        and threshold is not None
        and state.intent.order_type is OrderType.LIMIT
    ):
        filled = max(report.filled_quantity, state.filled)
        if filled >= state.intent.quantity * Decimal(str(threshold)):
            return T.PARTIAL_FILL_ENOUGH
    return trigger


def apply_report(
    state: IntentState,
    report: ExecutionReport,
    *,
    threshold: float | None = None,
    timing: Timing | None = None,
    at: datetime | None = None,
) -> Step:
    """Apply a venue report (see `step`); the same report twice is the same as once."""
    trigger = report_trigger(state, report, threshold)
    return step(state, IntentEvent(trigger, at or report.venue_time, report), timing)


class SignalState(Frozen):
    signal: Signal
    plan: Plan
    status: ResultStatus
    intents: tuple[IntentState, ...] = ()
    result_seq: int = 0
    reason: str = ""
    closing: ResultStatus | None = None
    """The final status an operator asked for (cancelled), reached once every order is done."""
    interventions: tuple[InterventionState, ...] = ()
    finished_at: datetime | None = None
    """When the signal last became terminal; it leaves memory `finished_linger_s` later."""

    def intent(self, intent_id: str) -> IntentState | None:
        return next((i for i in self.intents if i.intent.intent_id == intent_id), None)

    def cancelled_by(self, cancel_id: str) -> IntentState | None:
        """The intent a cancel intent (by id) was sent for."""
        return next((i for i in self.intents if cancel_id in i.cancel_ids), None)

    def with_intent(self, new: IntentState) -> SignalState:
        iid = new.intent.intent_id
        return self.model_copy(
            update={"intents": tuple(new if i.intent.intent_id == iid else i for i in self.intents)}
        )

    def lineage(self, intent_id: str) -> tuple[IntentState, ...]:
        """The intent and its ancestors (by `parent_intent_id`), oldest first."""
        by_id = {i.intent.intent_id: i for i in self.intents}
        chain: list[IntentState] = []
        current = by_id.get(intent_id)
        while current is not None and len(chain) <= len(by_id):
            chain.append(current)
            parent = current.intent.parent_intent_id
            current = by_id.get(parent) if parent is not None else None
        return tuple(reversed(chain))

    @property
    def leaves(self) -> tuple[IntentState, ...]:
        """Intents no later attempt continues: where each allocation's story ended."""
        parents = {i.intent.parent_intent_id for i in self.intents}
        return tuple(i for i in self.intents if i.intent.intent_id not in parents)

    @property
    def open_interventions(self) -> tuple[InterventionState, ...]:
        return tuple(iv for iv in self.interventions if iv.open)


def aggregate_status(state: SignalState) -> tuple[ResultStatus, str]:
    """The signal's status from its intents: open while any is open, then by what filled.

    A terminal status absorbs: once final, a signal stays final (a late fill is counted and
    escalated, not turned into a new status). An intervention that may still start a new attempt
    keeps the signal executing.
    """
    closing = state.closing
    if closing is None and state.status.terminal:
        closing = state.status
    if closing is not None:
        blocked = any(iv.blocking for iv in state.open_interventions)
        if all(i.terminal for i in state.intents) and (state.status.terminal or not blocked):
            return closing, state.reason
        return ResultStatus.EXECUTING, state.reason
    if not state.intents:
        return state.status, state.reason
    if any(not i.terminal for i in state.intents):
        return ResultStatus.EXECUTING, "orders open"
    if any(iv.blocking for iv in state.open_interventions):
        return ResultStatus.EXECUTING, "waiting for an intervention"
    filled = sum((i.filled for i in state.intents), start=Decimal(0))
    requested = state.plan.planned_total
    if filled >= requested:
        return ResultStatus.COMPLETED, f"filled {filled} of {requested}"
    if filled > 0:
        return ResultStatus.PARTIALLY_COMPLETED, f"filled {filled} of {requested}"
    leaves = state.leaves
    reasons = sorted({i.reason for i in leaves if i.reason})
    if all(i.status is IntentStatus.EXPIRED for i in leaves):
        return ResultStatus.EXPIRED, "; ".join(reasons) or "expired"
    return ResultStatus.FAILED, "; ".join(reasons) or "no fills"


def _requested(i: IntentState, by_id: dict[str, IntentState]) -> Decimal:
    """What this intent newly asked of its account: a same-account follow-up only changes the
    carried-over remainder (a retry adds nothing, a reduced retry takes some away)."""
    parent = by_id.get(i.intent.parent_intent_id or "")
    if parent is None or parent.intent.account_id != i.intent.account_id:
        return i.intent.quantity
    return i.intent.quantity - parent.remaining


def build_result(state: SignalState, now_seq: int, updated_at: datetime) -> ExecutionResult:
    """The ExecutionResult for the state as it is, with quantity-weighted average prices.

    Built without validation: every value comes from validated state or is computed here in the
    model's own types (a UTC `updated_at`, non-negative quantised amounts), and a release builds
    one, which validating made a third of its decision. `result_fields` is the same content as
    a dict, which tests validate against the model to hold the two equal.
    """
    fields = result_fields(state, now_seq, updated_at)
    fields["lines"] = tuple(map(ResultLine.assemble, fields["lines"]))
    return ExecutionResult.assemble(fields)


def result_fields(state: SignalState, now_seq: int, updated_at: datetime) -> dict[str, Any]:
    """The fields of `build_result`'s ExecutionResult, each line as a dict of its fields."""
    lines: list[dict[str, Any]] = []
    by_id = {i.intent.intent_id: i for i in state.intents}
    by_account: dict[str, list[IntentState]] = {}
    for i in state.intents:
        by_account.setdefault(i.intent.account_id, []).append(i)
    zero = Decimal(0)
    filled_total = notional_total = zero
    for account in sorted(by_account):
        mine = by_account[account]
        filled = notional = requested = zero
        for i in mine:
            filled += i.filled
            notional += i.notional
            if i.intent.kind is not IntentKind.CANCEL:
                requested += _requested(i, by_id)
        filled_total += filled
        notional_total += notional
        lines.append(
            {
                "account_id": account,
                "requested": max(requested, zero),
                "filled": filled,
                "avg_price": (notional / filled).quantize(_PRICE_STEP) if filled else None,
                "status": mine[-1].status.value,
                "attempts": len(mine),
            }
        )
    return {
        "signal_id": state.signal.signal_id,
        "portfolio": state.signal.portfolio,
        "status": state.status,
        "seq": now_seq,
        "lines": lines,
        "requested_total": state.plan.planned_total
        if state.plan.allocations
        else state.plan.requested,
        "filled_total": filled_total,
        "avg_price": (notional_total / filled_total).quantize(_PRICE_STEP)
        if filled_total
        else None,
        "reason": state.reason,
        "updated_at": updated_at.astimezone(UTC),
    }


_PRICE_STEP = Decimal("1e-8")
