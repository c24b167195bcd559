"""Golden replays: committed input streams through the current core, against committed outputs.

Each `scenarios/NAME.jsonl` is a recorded story for one portfolio: its configuration, account
states, then signals, execution reports, control commands and release ticks, each at a fixed
time. The runner feeds them to the decider (`on_signal`, `on_report`, `on_control`, `on_due`)
with that time as the clock, and writes every decision's outputs (intents, results,
interventions, audit types, rationales and numbers) to `expected/NAME.json`, indented so a
behaviour change reads as a plain diff in review.

A difference fails the test with that diff. When the change is intended, regenerate and commit
the new expectations: `ORCH_UPDATE_GOLDEN=1 pytest tests/replay` (or `make golden`).

Scenario lines (`kind` first):

* `config`: an `OrchConfig` document (first line);
* `accounts`: `states`, a list of `AccountState` documents (replacing those accounts' states);
* `signal`: `at`, `signal` (a `Signal` document);
* `report`: `at`, `signal_id`, `account_id`, `status`, optional `filled`, `price`,
  `reason_code`, `report_id`: a venue report on that account's latest order of the signal;
* `control`: `at`, `command` (a `ControlCommand` document);
* `due`: `at`: the release timer fires for every open signal.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from orch_worker.domain.config import OrchConfig
from orch_worker.domain.decider import (
    Context,
    Decision,
    PortfolioState,
    on_control,
    on_due,
    on_report,
    on_signal,
)
from orch_worker.domain.models import (
    AccountState,
    ControlCommand,
    ExecutionReport,
    IntentKind,
    Signal,
)

HERE = Path(__file__).parent
SCENARIOS = sorted((HERE / "scenarios").glob("*.jsonl"))
UPDATE = os.environ.get("ORCH_UPDATE_GOLDEN") == "1"

RECORDED_INPUTS = ("signal", "account_states", "other_account_states", "config")
"""Audit data that echoes the scenario's own inputs: left out of the expectations (the plan,
its context and the configuration digest stay in)."""


class Runner:
    """One portfolio's decider state, fed line by line."""

    def __init__(self, config: OrchConfig) -> None:
        [portfolio] = config.portfolios  # one portfolio per scenario: one decider state
        self.config = config
        self.accounts: dict[str, AccountState] = {}
        self.pf = PortfolioState(portfolio=portfolio)

    def _ctx(self, at: str) -> Context:
        return Context(config=self.config, now=datetime.fromisoformat(at), accounts=self.accounts)

    def _report(self, step: int, line: dict[str, Any]) -> ExecutionReport:
        st = self.pf.signals[line["signal_id"]]
        mine = [
            i.intent
            for i in st.intents
            if i.intent.account_id == line["account_id"] and i.intent.kind is not IntentKind.CANCEL
        ]
        intent = mine[-1]
        filled = Decimal(line.get("filled", "0"))
        price = line.get("price")
        return ExecutionReport.model_validate(
            {
                "report_id": line.get("report_id", f"r-{step}"),
                "intent_id": intent.intent_id,
                "account_id": intent.account_id,
                "order_id": f"ord-{intent.intent_id[:8]}",
                "status": line["status"],
                "filled_quantity": str(filled),
                "last_quantity": str(filled),
                "last_price": price,
                "avg_price": price,
                "leaves_quantity": str(max(intent.quantity - filled, Decimal(0))),
                "reason_code": line.get("reason_code"),
                "reason_text": "golden scenario" if line.get("reason_code") else None,
                "venue_time": line["at"],
            }
        )

    def step(self, step: int, line: dict[str, Any]) -> Decision | None:
        decision = self._decide(step, line)
        if decision is not None:
            self.pf = decision.state
        return decision

    def _decide(self, step: int, line: dict[str, Any]) -> Decision | None:
        pf = self.pf
        match line["kind"]:
            case "accounts":
                for doc in line["states"]:
                    state = AccountState.model_validate(doc)
                    self.accounts[state.account_id] = state
                return None
            case "signal":
                signal = Signal.model_validate(line["signal"])
                return on_signal(pf, signal, self._ctx(line["at"]))
            case "report":
                report = self._report(step, line)
                return on_report(pf, line["signal_id"], report, self._ctx(line["at"]))
            case "control":
                cmd = ControlCommand.model_validate(line["command"])
                return on_control(pf, cmd, self._ctx(line["at"]))
            case "due":
                open_ = [s for s, st in pf.signals.items() if not st.status.terminal]
                return on_due(pf, open_, self._ctx(line["at"]))
        raise ValueError(f"unknown scenario line kind {line['kind']!r}")


def _outputs(step: int, line: dict[str, Any], d: Decision) -> dict[str, Any]:
    return {
        "step": step,
        "input": line["kind"],
        "at": line.get("at"),
        "outcome": d.outcome,
        "intents": [i.model_dump(mode="json") for i in d.intents],
        "results": [r.model_dump(mode="json") for r in d.results],
        "interventions": [i.model_dump(mode="json") for i in d.interventions],
        "audit": [
            {
                "seq": e.seq,
                "type": e.type,
                "signal_id": e.signal_id,
                "intent_id": e.intent_id,
                "account_id": e.account_id,
                "rationale": e.rationale,
                "data": {k: v for k, v in e.data.items() if k not in RECORDED_INPUTS},
            }
            for e in d.audit
        ],
    }


def run(path: Path) -> list[dict[str, Any]]:
    lines = [orjson.loads(raw) for raw in path.read_bytes().splitlines() if raw.strip()]
    first = lines[0]
    assert first["kind"] == "config", f"{path.name}: the first line must be the configuration"
    runner = Runner(OrchConfig.model_validate(first["config"]))
    out: list[dict[str, Any]] = []
    for step, line in enumerate(lines[1:], start=1):
        decision = runner.step(step, line)
        if decision is not None:
            out.append(_outputs(step, line, decision))
    return out


def _text(outputs: list[dict[str, Any]]) -> str:
    return orjson.dumps(outputs, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n"


def _expected(path: Path) -> Path:
    return HERE / "expected" / f"{path.stem}.json"


def scenarios() -> Iterator[Any]:
    for path in SCENARIOS:
        yield pytest.param(path, id=path.stem)


@pytest.mark.parametrize("scenario", list(scenarios()))
def test_scenario_replays_to_its_committed_outputs(scenario: Path) -> None:
    actual = _text(run(scenario))
    expected_path = _expected(scenario)
    if UPDATE or not expected_path.exists():
        expected_path.write_text(actual, encoding="utf-8")
        if not UPDATE:
            pytest.fail(f"wrote new expectations {expected_path.name}: review and commit them")
        return
    expected = expected_path.read_text(encoding="utf-8")
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                actual.splitlines(keepends=True),
                f"expected/{expected_path.name}",
                "current core",
                n=2,
            )
        )
        pytest.fail(
            f"{scenario.name}: the core's behaviour changed (ORCH_UPDATE_GOLDEN=1 to accept):\n"
            + diff[:20_000],
            pytrace=False,
        )


def test_every_scenario_is_deterministic() -> None:
    for path in SCENARIOS:
        assert _text(run(path)) == _text(run(path)), path.name


def test_every_expectation_has_its_scenario() -> None:
    names = {p.stem for p in SCENARIOS}
    orphans = [p.name for p in (HERE / "expected").glob("*.json") if p.stem not in names]
    assert not orphans, f"expectations without a scenario: {orphans}"
