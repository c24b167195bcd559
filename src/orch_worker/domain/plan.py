"""The planner's output: who takes the signal, how much, who was left out and why.

A plan of a 10,000-account portfolio holds thousands of allocations and exclusions, and writing
each one's rationale and numbers costs several microseconds. So the planner may hand over a
*deferred* plan: its plan-wide fields are set, and `allocations` and `exclusions` are written from
columns the planner captured (`DeferredRows`) the first time anything reads them -- attribute
access, `model_dump` (also nested, e.g. inside the coordinator's state), `==`, `repr`, pickling.
A deferred plan and the same plan built eagerly are equal and dump the same JSON; validating a
dumped plan gives an ordinary one.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import (
    BaseModel,
    ConfigDict,
    JsonValue,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    model_serializer,
)

from orch_worker.domain.immutable import instance
from orch_worker.domain.models import Side
from orch_worker.domain.types import Amount, Identifier

_set = object.__setattr__


class PlanModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


Numbers = dict[str, Any]
"""The numbers behind a decision: JSON values (strings, numbers, booleans, None, and lists and
dicts of them), written by the planner. Declared `Any` rather than pydantic's `JsonValue`: the
JSON is the same, but `JsonValue` serialises each value through a Python-level discriminator
call -- a dozen per allocation, thousands of allocations per plan."""


class Allocation(PlanModel):
    account_id: Identifier
    broker: Identifier
    quantity: Amount
    rationale: str
    numbers: Numbers = {}


class Exclusion(PlanModel):
    account_id: Identifier
    reasons: tuple[str, ...]
    """Coded reasons with their numbers, e.g. `INSUFFICIENT_MARGIN: needed=412.50 free=180.00`."""


_ALLOCATION_FIELDS = frozenset(Allocation.model_fields)
_EXCLUSION_FIELDS = frozenset(Exclusion.model_fields)


def trusted_allocation(
    account_id: str,
    broker: str,
    quantity: Decimal,
    rationale: str,
    numbers: dict[str, JsonValue],
) -> Allocation:
    """An `Allocation` from values the planner computed from validated inputs, not re-validated.

    What `model_construct` does, without its per-field Python loop (it costs as much as
    validating): thousands of these make one plan.
    """
    return instance(
        Allocation,
        {
            "account_id": account_id,
            "broker": broker,
            "quantity": quantity,
            "rationale": rationale,
            "numbers": numbers,
        },
        set(_ALLOCATION_FIELDS),
    )


def trusted_exclusion(account_id: str, reasons: tuple[str, ...]) -> Exclusion:
    """An `Exclusion` from the planner's own ids and reason texts, not re-validated."""
    return instance(
        Exclusion, {"account_id": account_id, "reasons": reasons}, set(_EXCLUSION_FIELDS)
    )


class DeferredRows(Protocol):
    """What a deferred plan writes its allocations and exclusions from.

    Holds only values that never change after planning (copies, immutable models), never the
    live columns of an `AccountBook`: the book moves on as account states arrive.
    """

    def allocations(self) -> tuple[Allocation, ...]: ...

    def exclusions(self) -> tuple[Exclusion, ...]: ...

    def planned_total(self) -> Decimal:
        """The sum of the allocations' quantities, without writing them."""
        ...


_DEFERRED = ("allocations", "exclusions")


class Plan(PlanModel):
    plan_id: Identifier
    signal_id: Identifier
    portfolio: Identifier
    symbol: str
    side: Side
    method: str
    requested: Amount
    allocations: tuple[Allocation, ...]
    exclusions: tuple[Exclusion, ...]
    alternatives: tuple[Identifier, ...] = ()
    """Eligible accounts not allocated, best first: where a later reroute looks."""
    rejected_reason: str | None = None
    numbers: Numbers = {}
    """Plan-wide numbers: eligible and selected counts, remainder owners, correlation cluster."""

    _rows: DeferredRows | None = PrivateAttr(default=None)

    @classmethod
    def deferred(cls, rows: DeferredRows, **fields: Any) -> Plan:
        """A plan with every field but `allocations` and `exclusions`, which `rows` writes on
        first use. The fields come from the planner (validated inputs): not re-validated."""
        if len(fields) != len(_EAGER):
            raise TypeError(f"a deferred plan takes exactly {_EAGER}")
        return instance(cls, {f: fields[f] for f in _EAGER}, set(_FIELDS), {"_rows": rows})

    if not TYPE_CHECKING:  # mypy keeps seeing the declared fields, not an open __getattr__

        def __getattr__(self, name: str) -> Any:
            if name in _DEFERRED:
                private = object.__getattribute__(self, "__pydantic_private__")
                rows = private.get("_rows") if private else None
                if rows is not None:
                    value = getattr(rows, name)()
                    fields = {**self.__dict__, name: value}
                    # The JSON lists the fields in __dict__ order: keep the declared order.
                    _set(self, "__dict__", {f: fields[f] for f in _FIELDS if f in fields})
                    if all(f in fields for f in _DEFERRED):
                        private["_rows"] = None  # both written: let the columns go
                    return value
            return super().__getattr__(name)

    def materialise(self) -> Plan:
        """Write deferred allocations and exclusions now (a no-op for an eager plan)."""
        for name in _DEFERRED:
            getattr(self, name)
        return self

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> Any:
        return handler(self.materialise())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Plan):
            self.materialise()
            other.materialise()
        return super().__eq__(other)

    def __hash__(self) -> int:
        self.materialise()
        return super().__hash__()

    def __repr_args__(self) -> Any:
        self.materialise()
        return super().__repr_args__()

    def __iter__(self) -> Any:
        self.materialise()
        return super().__iter__()

    def __getstate__(self) -> dict[Any, Any]:
        self.materialise()
        return super().__getstate__()

    @property
    def planned_total(self) -> Amount:
        if "allocations" not in self.__dict__:
            rows = (self.__pydantic_private__ or {}).get("_rows")
            if rows is not None:
                total: Decimal = rows.planned_total()
                return total
        return sum((a.quantity for a in self.allocations), start=Decimal(0))


_FIELDS = tuple(Plan.model_fields)
_EAGER = tuple(f for f in _FIELDS if f not in _DEFERRED)
