"""The planner's inputs as audit data, and back: what makes `orch-worker replay` possible.

A plan is a pure function of (signal, account states, configuration, `PlanContext`). The worker
records all four in `plan_created` / `signal_rejected` so a replay needs nothing but the audit
store: not the configuration file as it is today (it may have changed), not the account-state
topic (it is compacted). Each piece is written so that reading it back gives the very values the
planner saw:

* account states: every state the planner was given for the portfolio's configured accounts,
  excluded ones too (an excluded account still counts in the correlation cluster and in the
  rotation of ties), as their JSON dump; past `STATES_PER_EVENT` unallocated accounts they go in
  `plan_inputs` events of their own, so no event outgrows a Kafka message;
* configuration: the part the planner reads for one portfolio (the portfolio, its accounts, every
  instrument and the correlations), without keys left at their defaults so the record stays
  small (a replay therefore uses the defaults of the code it runs: a changed default shows up as
  a difference, which is what a replay is for), and its SHA-256 digest, so two plans made under
  the same configuration say so;
* `PlanContext`: every field, including the ones the worker leaves empty today, so a replay can
  never silently run with a default where the worker had a value.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

import numpy as np
from pydantic import JsonValue

from orch_worker.domain.audit import AuditDraft
from orch_worker.domain.canonical import canonical_json, sha256_hex
from orch_worker.domain.config import OrchConfig
from orch_worker.domain.correlation import CorrelationMatrix
from orch_worker.domain.models import AccountState
from orch_worker.domain.planner import PlanContext
from orch_worker.domain.types import format_ts

CONFIG_SECTIONS = ("portfolios", "accounts", "instruments", "correlations")
"""The configuration sections a plan depends on; a snapshot holds exactly these."""


def config_snapshot(config: OrchConfig, portfolio: str) -> dict[str, JsonValue]:
    """The configuration one portfolio's plans depend on, as JSON without default values.

    All instruments are kept, not only the signal's: positions in any configured symbol weigh
    in the correlation checks, and the planner's columns are indexed by every instrument.
    """
    pf = config.portfolios.get(portfolio)
    return {
        "portfolios": {}
        if pf is None
        else {portfolio: pf.model_dump(mode="json", exclude_defaults=True)},
        "accounts": {
            a: config.accounts[a].model_dump(mode="json", exclude_defaults=True)
            for a in config.accounts_of(portfolio)
        },
        "instruments": {
            s: config.instruments[s].model_dump(mode="json", exclude_defaults=True)
            for s in sorted(config.instruments)
        },
        "correlations": {k: config.correlations[k] for k in sorted(config.correlations)},
    }


_SNAPSHOTS: dict[int, tuple[weakref.ref[OrchConfig], dict[str, tuple[dict[str, JsonValue], str]]]]
_SNAPSHOTS = {}
"""Memo of (snapshot, digest) per configuration object and portfolio. A configuration is frozen
and lives as long as the worker, so dumping and hashing it again for every signal would only
repeat the same work; keyed by identity and checked through a weak reference, so a new
configuration object (a test's, a reload's) is never served another's snapshot."""


def _snapshot_and_digest(config: OrchConfig, portfolio: str) -> tuple[dict[str, JsonValue], str]:
    key = id(config)
    entry = _SNAPSHOTS.get(key)
    if entry is None or entry[0]() is not config:
        entry = (weakref.ref(config, lambda _: _SNAPSHOTS.pop(key, None)), {})
        _SNAPSHOTS[key] = entry
    found = entry[1].get(portfolio)
    if found is None:
        snapshot = config_snapshot(config, portfolio)
        found = entry[1][portfolio] = (snapshot, config_digest(snapshot))
    return found


_STATE_DUMPS: dict[int, tuple[weakref.ref[AccountState], dict[str, JsonValue]]] = {}
"""Memo of each account state's JSON: a state is recorded with every signal of its portfolio
until the next state of that account replaces it, so it is dumped once, not once per signal."""


def _state_json(state: AccountState) -> dict[str, JsonValue]:
    key = id(state)
    entry = _STATE_DUMPS.get(key)
    if entry is not None and entry[0]() is state:
        return entry[1]
    dump = state.model_dump(mode="json")
    # The entry goes when the state does (its id may then be reused by another object).
    _STATE_DUMPS[key] = (weakref.ref(state, lambda _: _STATE_DUMPS.pop(key, None)), dump)
    return dump


def config_digest(snapshot: Mapping[str, Any]) -> str:
    """SHA-256 of the snapshot's canonical JSON: the configuration "version" of a plan."""
    return sha256_hex(canonical_json(dict(snapshot)))


def config_from_snapshot(snapshot: Mapping[str, Any]) -> OrchConfig:
    """An `OrchConfig` holding the recorded sections (everything else at its default)."""
    return OrchConfig.model_validate({k: snapshot.get(k, {}) for k in CONFIG_SECTIONS})


def planner_states(
    config: OrchConfig, portfolio: str, accounts: Mapping[str, AccountState]
) -> dict[str, AccountState]:
    """The states the planner reads for `portfolio`: those of its configured accounts."""
    out: dict[str, AccountState] = {}
    for a in config.accounts_of(portfolio):
        state = accounts.get(a)
        if state is not None:
            out[a] = state
    return out


def _floats(values: Mapping[str, float]) -> dict[str, JsonValue]:
    return {k: float(values[k]) for k in sorted(values)}


def plan_context_record(ctx: PlanContext) -> dict[str, JsonValue]:
    """Every field of `ctx` as JSON (sets sorted, decimals as strings, floats exact)."""
    corr: JsonValue = None
    if ctx.correlations is not None:
        corr = {
            "symbols": list(ctx.correlations.symbols),
            "matrix": [[float(x) for x in row] for row in ctx.correlations.matrix.tolist()],
        }
    paused: list[JsonValue] = [*sorted(ctx.paused_accounts)]
    cooldown: list[JsonValue] = [*sorted(ctx.cooldown_accounts)]
    return {
        "now": None if ctx.now is None else format_ts(ctx.now),
        "rotation": ctx.rotation,
        "paused_accounts": paused,
        "cooldown_accounts": cooldown,
        "risk_used_today": {k: str(ctx.risk_used_today[k]) for k in sorted(ctx.risk_used_today)},
        "health": _floats(ctx.health),
        "quality": _floats(ctx.quality),
        "correlations": corr,
    }


def plan_context_from_record(record: Mapping[str, Any]) -> PlanContext:
    """The `PlanContext` that `plan_context_record` wrote (missing keys take the defaults)."""
    now = record.get("now")
    corr = record.get("correlations")
    matrix = None
    if corr is not None:
        matrix = CorrelationMatrix(
            tuple(corr["symbols"]), np.array(corr["matrix"], dtype=np.float64)
        )
    return PlanContext(
        paused_accounts=frozenset(record.get("paused_accounts", ())),
        now=None if now is None else datetime.fromisoformat(now),
        cooldown_accounts=frozenset(record.get("cooldown_accounts", ())),
        risk_used_today={k: Decimal(v) for k, v in record.get("risk_used_today", {}).items()},
        health={k: float(v) for k, v in record.get("health", {}).items()},
        quality={k: float(v) for k, v in record.get("quality", {}).items()},
        correlations=matrix,
        rotation=int(record.get("rotation", 0)),
    )


def planner_inputs(
    config: OrchConfig,
    portfolio: str,
    accounts: Mapping[str, AccountState],
    allocated: frozenset[str],
    ctx: PlanContext | None,
) -> dict[str, JsonValue]:
    """The audit data that, with the signal and the plan, lets a replay re-make the plan.

    Args:
        config: the configuration the planner was given.
        portfolio: the signal's portfolio.
        accounts: the account states the planner was given (any mapping, e.g. the worker's book).
        allocated: accounts in the plan; their states are recorded under `account_states`
            (kept there for readers of the older format), the others under
            `other_account_states`.
        ctx: the planner's context, or None when the worker refused the signal before planning.
    """
    states = planner_states(config, portfolio, accounts)
    snapshot, digest = _snapshot_and_digest(config, portfolio)
    return {
        "account_states": {a: _state_json(s) for a, s in states.items() if a in allocated},
        "other_account_states": {
            a: _state_json(s) for a, s in states.items() if a not in allocated
        },
        "plan_context": None if ctx is None else plan_context_record(ctx),
        "config": snapshot,
        "config_digest": digest,
    }


STATES_PER_EVENT = 200
"""Account states one audit event carries at most. A large portfolio's states go into
`plan_inputs` events of this many each, ahead of the plan, so no single event outgrows a Kafka
message (about 500 bytes a state: 200 of them stay far below the default 1 MB limit)."""


def split_for_audit(
    signal_id: str, inputs: dict[str, JsonValue]
) -> tuple[dict[str, JsonValue], list[AuditDraft]]:
    """`inputs` without the unallocated states when there are too many for one event, and the
    `plan_inputs` drafts that carry them instead (`other_account_states_parts` says how many)."""
    others = inputs.get("other_account_states")
    if not isinstance(others, dict) or len(others) <= STATES_PER_EVENT:
        return inputs, []
    items = list(others.items())
    chunks = [dict(items[k : k + STATES_PER_EVENT]) for k in range(0, len(items), STATES_PER_EVENT)]
    drafts = [
        AuditDraft(
            type="plan_inputs",
            signal_id=signal_id,
            rationale=(
                f"planner inputs, part {k} of {len(chunks)}: the states of {len(chunk)} "
                "accounts the plan did not allocate to"
            ),
            data={"part": k, "parts": len(chunks), "other_account_states": chunk},
        )
        for k, chunk in enumerate(chunks, start=1)
    ]
    kept = {**inputs, "other_account_states": {}, "other_account_states_parts": len(chunks)}
    return kept, drafts
