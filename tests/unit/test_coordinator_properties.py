"""Properties of following a whole signal, over random but complete histories.

A history is whatever a venue and an operator might do, drawn by hypothesis: reports of every
status for any live order (cumulative fills, reject reasons, refusals of our cancels, the same
report again), timers firing, operators resolving interventions or cancelling the signal. After
it, the venue answers every order that is still live and the clock runs on, as it would in
production. Then every signal must be final; and along the way:

* a terminal intent keeps its status, and a final signal keeps its status;
* no quantity counted as filled ever goes away (per intent and per signal);
* the same report twice changes nothing the second time (no state change, no output);
* no intent id is ever released twice.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orch_worker.domain.coordinator import AT_VENUE, TERMINAL, IntentState, IntentStatus
from orch_worker.domain.decider import Decision, next_wake
from orch_worker.domain.models import (
    ExecutionReport,
    IntentKind,
    InterventionAction,
    ReasonCode,
    ReportStatus,
)
from tests import factories as f
from tests.unit.execution_helpers import Run, config, limit_signal

MAX_STEPS = 40
SETTLE_STEPS = 400


class Checked(Run):
    """A run that checks the invariants after every decision."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.released: set[str] = set()
        self.terminal_intents: dict[str, IntentStatus] = {}
        self.final_status: Any = None
        self.filled: dict[str, Decimal] = {}
        self.reports: list[tuple[ExecutionReport, str]] = []

    def keep(self, d: Decision) -> Decision:
        before = self.pf
        d = super().keep(d)
        for it in d.intents:
            assert it.intent_id not in self.released, f"{it.intent_id} released twice"
            self.released.add(it.intent_id)
        if "sig-1" in self.pf.signals:
            self._check(before)
        return d

    def _check(self, before: Any) -> None:
        st_ = self.pf.signals["sig-1"]
        for i in st_.intents:
            iid = i.intent.intent_id
            assert i.filled >= self.filled.get(iid, Decimal(0)), "a fill went away"
            self.filled[iid] = i.filled
            if iid in self.terminal_intents:
                assert i.status is self.terminal_intents[iid], "a terminal intent moved"
            elif i.status in TERMINAL:
                self.terminal_intents[iid] = i.status
        if self.final_status is not None:
            assert st_.status is self.final_status, "a final signal changed status"
        elif st_.status.terminal:
            self.final_status = st_.status
        del before

    def send_report(self, r: ExecutionReport) -> Decision:
        self.reports.append((r, "sig-1"))
        return self.send(r)


def live(run: Run) -> list[IntentState]:
    return [i for i in run.intents() if i.status in AT_VENUE]


statuses = st.sampled_from(list(ReportStatus))
codes = st.sampled_from(list(ReasonCode))


def random_report(data: st.DataObject, run: Checked, it: IntentState) -> ExecutionReport:
    status = data.draw(statuses, label="status")
    q = it.intent.quantity
    if status is ReportStatus.FILLED:
        filled = q if data.draw(st.booleans(), label="exact") else q + Decimal("0.01")
    elif status in (ReportStatus.ACCEPTED,):
        filled = it.filled
    else:
        cents = data.draw(st.integers(0, int(q * 100)), label="filled")
        filled = Decimal(cents) / 100
    code = data.draw(codes, label="code") if status is ReportStatus.REJECTED else None
    target = it.intent.intent_id
    about_cancel = bool(it.cancel_ids) and data.draw(st.booleans(), label="about the cancel")
    if about_cancel:
        target, status, code, filled = (
            it.cancel_ids[-1],
            ReportStatus.REJECTED,
            ReasonCode.OTHER,
            Decimal(0),
        )
    run._n += 1
    return f.report(
        target,
        it.intent.account_id,
        status.value,
        str(filled),
        n=run._n,
        price="1.1000",
        reason_code=code.value if code else None,
        at=run.now,
    )


def one_step(data: st.DataObject, run: Checked) -> None:
    choice = data.draw(st.sampled_from(["report", "report", "again", "time", "resolve", "cancel"]))
    orders = live(run)
    if choice == "report" and orders:
        it = data.draw(st.sampled_from(orders), label="order")
        run.send_report(random_report(data, run, it))
    elif choice == "again" and run.reports:
        r, _ = data.draw(st.sampled_from(run.reports), label="redelivered")
        before = run.pf
        d = run.send(r)
        assert d.outcome == "duplicate"
        assert not d.has_outputs
        assert run.pf is before
    elif choice == "time":
        run.t += data.draw(st.floats(0.1, 90), label="seconds")
        run.due()
    elif choice == "resolve" and run.st().open_interventions:
        iv = data.draw(st.sampled_from(run.st().open_interventions), label="intervention")
        action = data.draw(st.sampled_from(list(InterventionAction)), label="action")
        run._n += 1
        run.resolve(iv.intervention, action.value, command_id=f"c-{run._n}")
    elif choice == "cancel" and data.draw(st.integers(0, 9)) == 0:
        run._n += 1
        run.control(f"c-{run._n}", "cancel_signal", signal_id="sig-1")


def settle(data: st.DataObject, run: Checked) -> None:
    """The venue answers every live order with a final report; otherwise the clock runs."""
    for _ in range(SETTLE_STEPS):
        if run.status().terminal and not run.st().open_interventions:
            return
        orders = live(run)
        if orders:
            it = orders[0]
            status = data.draw(
                st.sampled_from(["filled", "rejected", "cancelled", "expired"]), label="final"
            )
            code = data.draw(codes, label="final code") if status == "rejected" else None
            filled = it.intent.quantity if status == "filled" else it.filled
            run._n += 1
            run.send_report(
                f.report(
                    it.intent.intent_id,
                    it.intent.account_id,
                    status,
                    str(filled),
                    n=run._n,
                    price="1.1000",
                    reason_code=code.value if code else None,
                    at=run.now,
                )
            )
            continue
        when = next_wake(run.st(), run.cfg)
        assert when is not None, f"stuck: {run.status()} with nothing to wait for"
        run.t = max(run.t, (when - f.NOW).total_seconds())
        run.due()
    raise AssertionError("the signal did not end")


EXECUTION = {
    "completion_timeout_s": 20,
    "ack_timeout_s": 10,
    "retry_base_s": 1,
    "retry_cap_s": 4,
    "intervention_timeout_s": 30,
}


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    data=st.data(),
    limit=st.booleans(),
    max_accounts=st.sampled_from([None, 1, 2]),
    default=st.sampled_from(["retry", "reroute", "accept_partial", "cancel"]),
    sessions=st.booleans(),
    steps=st.integers(0, MAX_STEPS),
)
def test_every_signal_ends_final_whatever_the_venue_and_operators_do(
    data: st.DataObject,
    limit: bool,
    max_accounts: int | None,
    default: str,
    sessions: bool,
    steps: int,
) -> None:
    instrument: dict[str, Any] = {"min_stop_distance": Decimal("0.0100")}
    if sessions:
        instrument["sessions"] = ("Mon-Sun 12:05-23:00",)
    cfg = config(
        max_accounts=max_accounts,
        execution={**EXECUTION, "intervention_default_action": default},
        instrument=instrument,
    )
    run = Checked(cfg, prices={"EURUSD": Decimal("1.1004")} if limit else {})
    sig = limit_signal(expires_at=f.NOW + timedelta(hours=2)) if limit else f.signal()
    run.signal(sig)
    for _ in range(steps):
        one_step(data, run)
    settle(data, run)

    final = run.pf.signals["sig-1"]
    assert final.status.terminal
    assert all(i.status in TERMINAL for i in final.intents)
    assert next_wake(final, cfg) is None or final.open_interventions
    kinds = {i.intent.kind for i in final.intents}
    assert IntentKind.CANCEL not in kinds  # cancels are messages, not orders
