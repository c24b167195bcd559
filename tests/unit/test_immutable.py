"""The core's frozen models copy and assemble exactly as pydantic would, only cheaper.

`Immutable.model_copy` must mean what `BaseModel.model_copy` means (a shallow copy, the update
not validated, the updated names counted as set), and `assemble` what validation would give for
values already in the model's types; the results the core builds with it are checked against
validation on every decision of the coordinator's property test as well.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel

from orch_worker.domain.coordinator import IntentStatus, build_result, result_fields
from orch_worker.domain.immutable import Immutable
from orch_worker.domain.models import ExecutionResult, ResultLine
from tests.unit.execution_helpers import Run, limit_signal


def exact(model: BaseModel) -> tuple[type, dict[str, Any], set[str]]:
    """A model as its type, each field's value with the value's type, and its fields set."""

    def typed(v: Any) -> Any:
        if isinstance(v, BaseModel):
            return exact(v)
        if isinstance(v, tuple):
            return tuple(typed(x) for x in v)
        return (type(v), v)

    return type(model), {k: typed(v) for k, v in model.__dict__.items()}, model.model_fields_set


def validated_result(fields: dict[str, Any]) -> ExecutionResult:
    return ExecutionResult.model_validate({**fields, "lines": tuple(fields["lines"])})


def test_model_copy_is_pydantics_shallow_copy() -> None:
    run = Run()
    run.signal(limit_signal())
    intent = run.intents()[0].intent
    ours = intent.model_copy(update={"attempt": 7, "rationale": "x"})
    theirs = BaseModel.model_copy(intent, update={"attempt": 7, "rationale": "x"})
    assert exact(ours) == exact(theirs)
    assert ours.model_fields_set == intent.model_fields_set | {"attempt", "rationale"}
    assert intent.attempt == 1  # the original is untouched
    plain = intent.model_copy()
    assert exact(plain) == exact(intent)
    assert plain is not intent
    assert plain.model_fields_set is not intent.model_fields_set


def test_model_copy_refuses_a_field_the_model_does_not_have() -> None:
    run = Run()
    run.signal(limit_signal())
    with pytest.raises(TypeError, match="quantty"):
        run.intents()[0].intent.model_copy(update={"quantty": Decimal(1)})


def test_deep_copy_is_left_to_pydantic() -> None:
    run = Run()
    run.signal(limit_signal())
    state = run.pf.signals["sig-1"]
    deep = state.model_copy(update={"reason": "r"}, deep=True)
    assert deep.intents[0] == state.intents[0]
    assert deep.intents[0] is not state.intents[0]


def test_assemble_equals_validation_and_refuses_missing_or_unknown_fields() -> None:
    fields = {
        "account_id": "A1",
        "requested": Decimal("0.50"),
        "filled": Decimal("0.2"),
        "avg_price": Decimal("1.10000000"),
        "status": "partially_filled",
        "attempts": 2,
    }
    assert exact(ResultLine.assemble(fields)) == exact(ResultLine.model_validate(fields))
    with pytest.raises(TypeError, match="missing \\['attempts'\\]"):
        ResultLine.assemble({k: v for k, v in fields.items() if k != "attempts"})
    with pytest.raises(TypeError, match="unknown \\['extra'\\]"):
        ResultLine.assemble({**fields, "extra": 1})


class _Later(Immutable):
    at: datetime
    n: int = 3


def test_assemble_fills_plain_defaults_only() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    assert exact(_Later.assemble({"at": at})) == exact(_Later.model_validate({"at": at}))


def test_build_result_equals_the_validated_result_after_fills() -> None:
    """Every result a decider test makes is checked too (`execution_helpers.Run.keep`)."""
    run = Run()
    run.signal(limit_signal())
    while any(i.status is IntentStatus.SCHEDULED for i in run.intents()):
        run.wake()
    first, second, *_ = run.intents()
    run.at(run.t + 1).report(first, "partially_filled", "0.10", price="1.1002")
    run.at(run.t + 1).report(second, "filled", second.intent.quantity, price="1.1004")
    state = run.st()
    assert sum(i.filled for i in state.intents) > 0
    # An offset other than UTC is normalised, as the model's validator does.
    at = datetime(2026, 3, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    built = build_result(state, 9, at)
    assert exact(built) == exact(validated_result(result_fields(state, 9, at)))
    assert built.updated_at.tzinfo is UTC
    assert built.updated_at == at
