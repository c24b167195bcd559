"""Escalation: decisions the orchestrator will not take alone.

An `Intervention` goes out on `orch.interventions` with the actions a human may choose and the
one taken if nobody answers by `timeout_at`. A `resolve_intervention` control command picks an
action; the venue answering after all settles it too. Which actions make sense depends on why it
was opened, so the options are a literal table here.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from orch_worker.domain import ids
from orch_worker.domain.immutable import Immutable
from orch_worker.domain.models import Intervention, InterventionAction

A = InterventionAction
ALL_ACTIONS = (A.RETRY, A.REROUTE, A.ACCEPT_PARTIAL, A.CANCEL)

UNKNOWN_OUTCOME = "unknown_outcome"
OVERFILL = "overfill"
LATE_FILL = "late_fill"

OPTIONS: dict[str, tuple[InterventionAction, ...]] = {
    UNKNOWN_OUTCOME: ALL_ACTIONS,  # retry/reroute only once a human has checked the venue
    "invalid_symbol": ALL_ACTIONS,
    "other": ALL_ACTIONS,
    OVERFILL: (A.ACCEPT_PARTIAL, A.CANCEL),  # nothing to re-send: acknowledge, or stop the rest
    LATE_FILL: (A.ACCEPT_PARTIAL, A.CANCEL),
}
"""Actions offered per reason code; a code not named here is offered every action."""


def options_for(reason_code: str) -> tuple[InterventionAction, ...]:
    return OPTIONS.get(reason_code, ALL_ACTIONS)


def default_action(reason_code: str, configured: str) -> InterventionAction:
    """The configured default if it is an option, else accept_partial.

    An unknown outcome is never retried by default: re-sending to the same account without a
    human having checked the venue could trade twice.
    """
    action = InterventionAction(configured)
    if action not in options_for(reason_code):
        return A.ACCEPT_PARTIAL
    if reason_code == UNKNOWN_OUTCOME and action is A.RETRY:
        return A.ACCEPT_PARTIAL
    return action


class InterventionState(Immutable):
    """An intervention and what became of it (kept in the signal's state)."""

    intervention: Intervention
    open: bool = True
    action: InterventionAction | None = None
    """What was done: chosen by `resolved_by`, or the default at the timeout."""
    resolved_by: str | None = None
    resolved_at: datetime | None = None
    note: str | None = None

    @property
    def intervention_id(self) -> str:
        return self.intervention.intervention_id

    @property
    def blocking(self) -> bool:
        """Its resolution may start a new attempt, so the signal cannot be final yet."""
        opts = self.intervention.options
        return A.RETRY in opts or A.REROUTE in opts


def new_intervention(
    *,
    signal_id: str,
    portfolio: str,
    intent_id: str,
    account_id: str,
    reason_code: str,
    reason: str,
    now: datetime,
    timeout_s: float,
    configured_default: str,
    earlier: int,
) -> Intervention:
    """An intervention with a deterministic id; `earlier` counts this intent's previous ones
    with the same reason code, so a second escalation of one order gets its own id."""
    key = reason_code if earlier == 0 else f"{reason_code}#{earlier + 1}"
    return Intervention(
        intervention_id=ids.intervention_id(signal_id, intent_id, key),
        signal_id=signal_id,
        portfolio=portfolio,
        intent_id=intent_id,
        account_id=account_id,
        reason_code=reason_code,
        reason=reason,
        options=options_for(reason_code),
        default_action=default_action(reason_code, configured_default),
        created_at=now,
        timeout_at=now + timedelta(seconds=timeout_s),
    )


def resolved(
    state: InterventionState,
    action: InterventionAction | None,
    by: str,
    at: datetime,
    note: str,
) -> InterventionState:
    return state.model_copy(
        update={"open": False, "action": action, "resolved_by": by, "resolved_at": at, "note": note}
    )
