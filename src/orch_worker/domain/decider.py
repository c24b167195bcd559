"""The worker's decisions for one portfolio: (state, input, context) -> (state, outputs).

One function per input kind. Each returns the whole new portfolio state and every message the
shell must publish, audit events already chained. Nothing here is performed: the shell writes the
decision to its changelog first, then publishes the outputs, then commits the input offset.
Following orders after their release (the intent state machine's effects, recovery, completion,
escalation) is `execution`'s; this module routes each input to it and chains the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from pydantic import JsonValue

from orch_worker.domain import execution, ids
from orch_worker.domain.audit import AuditDraft, ChainHead, chain_json
from orch_worker.domain.config import OrchConfig
from orch_worker.domain.coordinator import (
    Frozen,
    IntentState,
    IntentStatus,
    SignalState,
    aggregate_status,
    build_result,
)
from orch_worker.domain.execution import Env, Follow, Work
from orch_worker.domain.models import (
    AccountState,
    AuditEvent,
    ControlCommand,
    ControlType,
    ExecutionReport,
    ExecutionResult,
    IntentKind,
    Intervention,
    OrderIntent,
    ResultStatus,
    Signal,
)
from orch_worker.domain.plan import Plan
from orch_worker.domain.planner import PlanContext, plan_signal
from orch_worker.domain.recording import planner_inputs, split_for_audit
from orch_worker.domain.recovery import AccountHealth
from orch_worker.domain.scheduling import Schedule, schedule
from orch_worker.domain.types import format_ts

MAX_REMEMBERED_COMMANDS = 10_000


class PortfolioState(Frozen):
    portfolio: str
    audit_seq: int = 0
    audit_hash: str = "0" * 64
    halted: bool = False
    paused_accounts: frozenset[str] = frozenset()
    signals: dict[str, SignalState] = {}
    seen_commands: tuple[str, ...] = ()
    account_health: dict[str, AccountHealth] = {}
    """Recent failures, open circuit breakers and suspension cooldowns per account."""
    forgotten: dict[str, datetime] = {}
    """Ids of finished signals no longer held in memory, with their `created_at`: a redelivered
    copy is still a duplicate until it would be refused as stale anyway (see `forget_finished`)."""

    @property
    def head(self) -> ChainHead:
        return ChainHead(self.audit_seq, self.audit_hash)

    def resting_accounts(self, now: datetime) -> frozenset[str]:
        """Accounts left out of planning: breaker open or suspension cooldown running."""
        return frozenset(a for a, h in self.account_health.items() if h.resting(now))


@dataclass(frozen=True, slots=True)
class Decision:
    state: PortfolioState
    outcome: str
    """What happened, for metrics and logs: planned, rejected, duplicate, applied, ..."""
    changed_signals: tuple[str, ...] = ()
    intents: tuple[OrderIntent, ...] = ()
    results: tuple[ExecutionResult, ...] = ()
    interventions: tuple[Intervention, ...] = ()
    audit: tuple[AuditEvent, ...] = ()
    audit_json: tuple[bytes, ...] = ()
    """Each audit event's JSON as it is published (see `audit.chain_json`)."""

    @property
    def has_outputs(self) -> bool:
        return bool(self.intents or self.results or self.interventions or self.audit)


@dataclass(frozen=True, slots=True)
class Context:
    config: OrchConfig
    now: datetime
    accounts: Mapping[str, AccountState] = field(default_factory=dict)
    broker_taken: Mapping[str, Sequence[datetime]] = field(default_factory=dict)
    """Release times already reserved at each broker, by every portfolio of this worker."""
    prices: Mapping[str, Decimal] = field(default_factory=dict)
    """Latest known price per symbol, for the drift budget."""
    listening_since: Mapping[str, datetime] = field(default_factory=dict)
    """Per portfolio, when this worker began reading its inputs (start-up or handover): order
    timeouts count only time spent listening (`execution.effective_deadline`)."""


def _finish(
    pf: PortfolioState,
    outcome: str,
    drafts: list[AuditDraft],
    now: datetime,
    *,
    changed: dict[str, SignalState] | None = None,
    intents: tuple[OrderIntent, ...] = (),
    publish_results: bool = True,
    interventions: tuple[Intervention, ...] = (),
    extra: dict[str, object] | None = None,
) -> Decision:
    changed = changed or {}
    results: list[ExecutionResult] = []
    signals = dict(pf.signals)
    for sid, before in changed.items():
        status, reason = aggregate_status(before)
        previous = pf.signals.get(sid)
        if previous is None or previous.status != status:
            drafts.append(
                AuditDraft(
                    type="signal_status",
                    signal_id=sid,
                    rationale=f"signal is {status.value}: {reason}",
                    data={"signal_status": status.value, "reason": reason},
                )
            )
        finished_at = None
        if status.terminal:
            was_terminal = previous is not None and previous.status.terminal
            finished_at = previous.finished_at if was_terminal and previous else None
            finished_at = finished_at or now
        st = before.model_copy(
            update={"status": status, "reason": reason, "finished_at": finished_at}
        )
        if publish_results:
            st = st.model_copy(update={"result_seq": st.result_seq + 1})
            results.append(build_result(st, st.result_seq, now))
        signals[sid] = st
    head, events, written = chain_json(pf.portfolio, pf.head, drafts, now)
    new = pf.model_copy(
        update={"signals": signals, "audit_seq": head.seq, "audit_hash": head.hash, **(extra or {})}
    )
    return Decision(
        state=new,
        outcome=outcome,
        changed_signals=tuple(changed),
        intents=intents,
        results=tuple(results),
        interventions=interventions,
        audit=events,
        audit_json=written,
    )


def _refuse(signal: Signal, now: datetime, ctx: Context, pf: PortfolioState) -> str | None:
    if pf.halted:
        return "HALTED: the portfolio is halted by a control command"
    if signal.expires_at is not None and now >= signal.expires_at:
        return f"EXPIRED: expires_at={signal.expires_at.isoformat()} is past"
    age = now - signal.created_at
    if age > timedelta(seconds=ctx.config.worker.max_signal_age_s):
        return (
            f"STALE: signal is {age.total_seconds():.0f}s old, "
            f"max_signal_age_s={ctx.config.worker.max_signal_age_s:.0f}"
        )
    return None


def _plan_drafts(
    plan: Plan, signal: Signal, ctx: Context, plan_ctx: PlanContext | None
) -> list[AuditDraft]:
    """Exclusions, then the plan (or rejection) with every input a replay needs.

    `plan_ctx` is what the planner was given, None when the signal was refused before planning.
    """
    drafts = [
        AuditDraft(
            type="account_excluded",
            signal_id=signal.signal_id,
            account_id=e.account_id,
            rationale=f"{e.account_id} left out: " + "; ".join(e.reasons),
            data={"reasons": list(e.reasons)},
        )
        for e in plan.exclusions
    ]
    recorded, parts = split_for_audit(
        signal.signal_id,
        planner_inputs(
            ctx.config,
            signal.portfolio,
            ctx.accounts,
            frozenset(a.account_id for a in plan.allocations),
            plan_ctx,
        ),
    )
    drafts += parts  # a large portfolio's states, in events of their own
    inputs: dict[str, JsonValue] = {
        "signal": signal.model_dump(mode="json"),
        "plan": plan.model_dump(mode="json"),
        **recorded,
    }
    if plan.rejected_reason:
        drafts.append(
            AuditDraft(
                type="signal_rejected",
                signal_id=signal.signal_id,
                rationale=f"signal rejected: {plan.rejected_reason}",
                data={"signal_status": ResultStatus.REJECTED.value, **inputs},
            )
        )
    else:
        drafts.append(
            AuditDraft(
                type="plan_created",
                signal_id=signal.signal_id,
                rationale=(
                    f"{plan.method} plan for {plan.planned_total} of {plan.requested} "
                    f"{signal.symbol} over {len(plan.allocations)} accounts, "
                    f"{len(plan.exclusions)} excluded"
                ),
                data={"signal_status": ResultStatus.PLANNED.value, **inputs},
            )
        )
    return drafts


def scheduled_intents(plan: Plan, signal: Signal, sched: Schedule) -> tuple[OrderIntent, ...]:
    """Initial intents for every allocation, at their scheduled times (not yet released).

    `released_at` holds the scheduled time until the release itself stamps the real one.
    """
    by_account = {a.account_id: a for a in plan.allocations}
    return tuple(
        OrderIntent(
            intent_id=ids.intent_id(signal.signal_id, slot.account_id, 1),
            plan_id=plan.plan_id,
            signal_id=signal.signal_id,
            portfolio=signal.portfolio,
            account_id=slot.account_id,
            broker=slot.broker,
            symbol=signal.symbol,
            side=signal.side,
            order_type=signal.order_type,
            quantity=by_account[slot.account_id].quantity,
            limit_price=signal.limit_price,
            stop_loss=signal.stop_loss,
            take_profit=signal.take_profit,
            reference_price=signal.reference_price,
            kind=IntentKind.INITIAL,
            attempt=1,
            scheduled_at=slot.scheduled_at,
            released_at=slot.scheduled_at,
            rationale=f"{by_account[slot.account_id].rationale}; "
            f"release #{slot.position + 1}: {'; '.join(slot.reasons)}",
        )
        for slot in sched.slots
    )


def _portfolio_taken(pf: PortfolioState, since: datetime) -> list[datetime]:
    return [
        i.intent.scheduled_at
        for st in pf.signals.values()
        if not st.status.terminal
        for i in st.intents
        if i.intent.scheduled_at >= since and i.intent.kind is not IntentKind.CANCEL
    ]


def _schedule_drafts(signal: Signal, sched: Schedule) -> AuditDraft:
    return AuditDraft(
        type="schedule_created",
        signal_id=signal.signal_id,
        rationale=sched.rationale,
        data={
            "urgent": sched.urgent,
            "window_s": [sched.window[0], sched.window[1]],
            "rotation": sched.rotation,
            "order": list(sched.order),
            "slots": [
                {
                    "account_id": s.account_id,
                    "broker": s.broker,
                    "position": s.position,
                    "base_delay_s": round(s.base_delay_s, 6),
                    "scheduled_at": format_ts(s.scheduled_at),
                    "reasons": list(s.reasons),
                }
                for s in sched.slots
            ],
        },
    )


def _env(pf: PortfolioState, ctx: Context) -> Env:
    return Env(
        config=ctx.config,
        now=ctx.now,
        accounts=ctx.accounts,
        prices=ctx.prices,
        paused=pf.paused_accounts,
        halted=pf.halted,
        listening_since=ctx.listening_since.get(pf.portfolio),
    )


def _work(pf: PortfolioState, ctx: Context) -> Work:
    """A fresh accumulator; rests that ended since the last decision are audited first."""
    health = dict(pf.account_health)
    drafts = execution.wake_rested(health, ctx.now, pf.portfolio)
    return Work(health=health, drafts=drafts)


def _health(work: Work) -> dict[str, object]:
    return {"account_health": {a: h for a, h in sorted(work.health.items()) if not h.empty}}


def next_wake(
    st: SignalState, config: OrchConfig, listening_since: datetime | None = None
) -> datetime | None:
    """When this signal next needs the clock: the earliest pending release (or its expiry), an
    order's acknowledgement or completion timeout, a retry's backoff (a scheduled intent), an
    intervention's deadline.

    The shell sets one alarm per answer and calls `on_due` then; an alarm that finds nothing
    due is harmless, so a stale answer costs a wake-up, never a wrong action.
    """
    exe = config.portfolios[st.signal.portfolio].execution
    return execution.next_wake(st, exe, listening_since)


def on_due(pf: PortfolioState, signal_ids: Sequence[str], ctx: Context) -> Decision:
    """Timers fired: release (or expire) due intents, time out silent or slow orders, and
    take the default action of interventions nobody resolved."""
    env, work = _env(pf, ctx), _work(pf, ctx)
    changed: dict[str, SignalState] = {}
    for sid in signal_ids:
        st = pf.signals.get(sid)
        if st is None or (st.status.terminal and not st.open_interventions):
            continue
        before = len(work.drafts)
        new = Follow(env, work).due_timers(st)
        if new is not st or len(work.drafts) > before:
            changed[sid] = new
    if not changed and not work.drafts:
        return Decision(state=pf, outcome="nothing_due")
    return _finish(
        pf,
        "released" if work.intents else "timers",
        work.drafts,
        ctx.now,
        changed=changed,
        intents=tuple(work.intents),
        interventions=tuple(work.interventions),
        extra=_health(work),
    )


def on_signal(pf: PortfolioState, signal: Signal, ctx: Context) -> Decision:
    if signal.signal_id in pf.signals or signal.signal_id in pf.forgotten:
        return Decision(state=pf, outcome="duplicate")
    now = ctx.now
    env, work = _env(pf, ctx), _work(pf, ctx)
    drafts = work.drafts
    drafts.append(
        AuditDraft(
            type="signal_received",
            signal_id=signal.signal_id,
            rationale=(
                f"{signal.side.value} {signal.quantity or 'risk-sized'} {signal.symbol} "
                f"{signal.order_type.value} from {signal.strategy_id}"
            ),
            data={"signal_status": "received"},
        )
    )
    refusal = _refuse(signal, now, ctx, pf)
    plan_ctx: PlanContext | None = None
    if refusal is not None:
        plan = Plan(
            plan_id=ids.plan_id(signal.signal_id),
            signal_id=signal.signal_id,
            portfolio=signal.portfolio,
            symbol=signal.symbol,
            side=signal.side,
            method="none",
            requested=signal.quantity or 0,
            allocations=(),
            exclusions=(),
            rejected_reason=refusal,
        )
    else:
        # Rotation: how many signals this portfolio has planned, so ties (remainder lots,
        # ranking) take turns across signals; it comes from state, so a replay agrees.
        # Accounts resting after failures are left out, and recent failures lower the score.
        exe = ctx.config.portfolios[signal.portfolio].execution
        health = {
            a: h.score(now, exe) for a, h in sorted(work.health.items()) if h.score(now, exe) < 1.0
        }
        plan = plan_signal(
            signal,
            ctx.accounts,
            ctx.config,
            plan_ctx := PlanContext(
                paused_accounts=pf.paused_accounts,
                now=now,
                rotation=len(pf.signals),
                cooldown_accounts=work.resting(now),
                health=health,
            ),
        )
    drafts += _plan_drafts(plan, signal, ctx, plan_ctx)
    if plan.rejected_reason:
        status = (
            ResultStatus.EXPIRED
            if plan.rejected_reason.startswith("EXPIRED")
            else ResultStatus.REJECTED
        )
        st = SignalState(signal=signal, plan=plan, status=status, reason=plan.rejected_reason)
        return _finish(
            pf, "rejected", drafts, now, changed={signal.signal_id: st}, extra=_health(work)
        )
    portfolio_cfg = ctx.config.portfolios[signal.portfolio]
    sched = schedule(
        [(a.account_id, a.broker) for a in plan.allocations],
        signal,
        portfolio_cfg.stagger,
        ctx.config.brokers,
        rotation=len(pf.signals),
        now=now,
        # Reservations only matter when a spacing rule can conflict with them; gathering them
        # costs a walk over every open signal, so skip it when there is no such rule.
        portfolio_taken=(
            _portfolio_taken(pf, now - timedelta(seconds=portfolio_cfg.stagger.min_spacing_s))
            if portfolio_cfg.stagger.min_spacing_s > 0
            else ()
        ),
        broker_taken=ctx.broker_taken,
    )
    drafts.append(_schedule_drafts(signal, sched))
    st = SignalState(
        signal=signal,
        plan=plan,
        status=ResultStatus.PLANNED,
        intents=tuple(
            IntentState(intent=i, status=IntentStatus.SCHEDULED)
            for i in scheduled_intents(plan, signal, sched)
        ),
    )
    st = Follow(env, work).release_due(st)
    return _finish(
        pf,
        "planned",
        drafts,
        now,
        changed={signal.signal_id: st},
        intents=tuple(work.intents),
        extra=_health(work),
    )


def on_report(
    pf: PortfolioState, signal_id: str, report: ExecutionReport, ctx: Context
) -> Decision:
    """A venue report: through the intent table, then whatever it calls for (a retry, a
    completion, an escalation). A report naming no intent of the signal is counted
    (`unknown_intent`) and changes nothing; a redelivered one is a `duplicate`."""
    st = pf.signals.get(signal_id)
    if st is None:
        return Decision(state=pf, outcome="unknown_intent")
    env, work = _env(pf, ctx), _work(pf, ctx)
    new, outcome = Follow(env, work).on_report(st, report)
    if outcome in ("duplicate", "unknown_intent"):
        return Decision(state=pf, outcome=outcome)
    return _finish(
        pf,
        outcome,
        work.drafts,
        ctx.now,
        changed={signal_id: new},
        intents=tuple(work.intents),
        interventions=tuple(work.interventions),
        extra=_health(work),
    )


def _cancel_pending(
    pf: PortfolioState, why: str, env: Env, work: Work, account_id: str | None = None
) -> dict[str, SignalState]:
    changed: dict[str, SignalState] = {}
    for sid, st in pf.signals.items():
        if st.status.terminal:
            continue
        new = Follow(env, work).cancel_scheduled(st, why, account_id)
        if new is not st:
            changed[sid] = new
    return changed


def _find_intervention(pf: PortfolioState, cmd: ControlCommand) -> SignalState | None:
    wanted = cmd.intervention_id
    candidates = [pf.signals[cmd.signal_id]] if cmd.signal_id in pf.signals else pf.signals.values()
    return next(
        (st for st in candidates if any(iv.intervention_id == wanted for iv in st.interventions)),
        None,
    )


def _resolve(
    pf: PortfolioState, cmd: ControlCommand, follow: Follow, changed: dict[str, SignalState]
) -> tuple[str, str]:
    """A `resolve_intervention` command: the outcome and why; the signal joins `changed`."""
    st = _find_intervention(pf, cmd)
    if st is None or cmd.action is None or cmd.intervention_id is None:
        return "unknown_target", f"no intervention {cmd.intervention_id}"
    new, outcome, why = follow.resolve(
        st, cmd.intervention_id, cmd.action, cmd.reroute_account_id, cmd.issued_by
    )
    if outcome == "applied":
        changed[st.signal.signal_id] = new
    return outcome, why


def on_control(pf: PortfolioState, cmd: ControlCommand, ctx: Context) -> Decision:
    if cmd.command_id in pf.seen_commands:
        return Decision(state=pf, outcome="duplicate")
    seen = (*pf.seen_commands, cmd.command_id)[-MAX_REMEMBERED_COMMANDS:]
    env, work = _env(pf, ctx), _work(pf, ctx)
    rested, work.drafts = work.drafts, []  # audited before the command; its effects after it
    changed: dict[str, SignalState] = {}
    who = f"{cmd.type.value} by {cmd.issued_by}" + (f" ({cmd.reason})" if cmd.reason else "")
    outcome = "applied"
    extra: dict[str, object] = {"seen_commands": seen}
    match cmd.type:
        case ControlType.PAUSE_ACCOUNT:
            extra["paused_accounts"] = pf.paused_accounts | {cmd.account_id}
            changed = _cancel_pending(
                pf, f"{cmd.account_id} paused; {who}", env, work, cmd.account_id
            )
            rationale = (
                f"{cmd.account_id} paused: no new orders until resumed, "
                f"{len(work.drafts)} pending releases cancelled; {who}"
            )
        case ControlType.RESUME_ACCOUNT:
            extra["paused_accounts"] = pf.paused_accounts - {cmd.account_id}
            rationale = f"{cmd.account_id} resumed; {who}"
        case ControlType.HALT:
            extra["halted"] = True
            changed = _cancel_pending(pf, f"portfolio halted; {who}", env, work)
            rationale = (
                f"portfolio halted: new signals are refused, {len(work.drafts)} pending releases "
                f"cancelled (resume does not bring them back); {who}"
            )
        case ControlType.RESUME:
            extra["halted"] = False
            rationale = f"portfolio resumed; {who}"
        case ControlType.CANCEL_SIGNAL:
            st = pf.signals.get(cmd.signal_id or "")
            if st is None:
                outcome, rationale = "unknown_target", f"no such signal {cmd.signal_id}; {who}"
            elif st.status.terminal:
                outcome, rationale = "no_op", f"signal already {st.status.value}; {who}"
            else:
                new, n = Follow(env, work).cancel_signal(
                    st, f"cancel_signal: {who}", reason=f"cancelled: {who}"
                )
                changed[st.signal.signal_id] = new
                rationale = f"signal cancelled, {n} open orders asked to cancel; {who}"
        case ControlType.RESOLVE_INTERVENTION:
            outcome, why = _resolve(pf, cmd, Follow(env, work), changed)
            rationale = f"{why}; {who}"
    drafts = [
        *rested,
        AuditDraft(
            type="control_applied",
            signal_id=cmd.signal_id,
            account_id=cmd.account_id,
            rationale=rationale,
            data={
                "command": cmd.model_dump(mode="json", exclude={"signature"}),
                "outcome": outcome,
            },
        ),
        *work.drafts,
    ]
    return _finish(
        pf,
        outcome,
        drafts,
        ctx.now,
        changed=changed,
        intents=tuple(work.intents),
        interventions=tuple(work.interventions),
        extra=extra | _health(work),
    )


def forget_finished(
    pf: PortfolioState, now: datetime, config: OrchConfig
) -> tuple[PortfolioState, tuple[SignalState, ...]]:
    """Drop finished signals from memory once they have lingered; returns what was dropped.

    Memory would otherwise grow with every signal ever decided. A signal is dropped when it is
    terminal, has no open intervention and finished `finished_linger_s` ago (late reports for
    its orders are dead-lettered after that). Its id is kept, with its `created_at`, for as
    long as a redelivered copy could still pass the `max_signal_age_s` check, so a redelivery
    remains a duplicate; after that any copy is refused as stale. Nothing here is written to
    the changelog: recovery rebuilds the full history and forgets the same signals again.
    """
    linger = timedelta(seconds=config.worker.finished_linger_s)
    max_age = timedelta(seconds=config.worker.max_signal_age_s)
    gone = tuple(
        st
        for st in pf.signals.values()
        if st.status.terminal
        and not st.open_interventions
        and now - (st.finished_at or st.signal.created_at) >= linger
    )
    expired = [sid for sid, created in pf.forgotten.items() if now - created > max_age]
    if not gone and not expired:
        return pf, ()
    forgotten = {s: c for s, c in pf.forgotten.items() if now - c <= max_age}
    for st in gone:
        if now - st.signal.created_at <= max_age:
            forgotten[st.signal.signal_id] = st.signal.created_at
    dropped = {st.signal.signal_id for st in gone}
    signals = {sid: st for sid, st in pf.signals.items() if sid not in dropped}
    return pf.model_copy(update={"signals": signals, "forgotten": forgotten}), gone
