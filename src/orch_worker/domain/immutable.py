"""The base of the core's frozen models, with a shallow `model_copy` that costs a dict merge.

Every decision rebuilds state by copying frozen models with a few fields changed: a release
copies about nine (the intent, its state, the signal's state twice, the portfolio's). pydantic's
own `model_copy` copies four attributes through `copy.copy` and re-reads the model's config
each time, which made the copies a sixth of a release's decision. The copy here has the same
meaning (shallow, no validation of the update, the updated names counted as set) and refuses a
name the model does not have, where pydantic would put it in `__dict__` silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self, TypeVar

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticUndefined

_set = object.__setattr__
_M = TypeVar("_M", bound=BaseModel)


def instance(
    cls: type[_M],
    values: dict[str, Any],
    fields_set: set[str],
    private: dict[str, Any] | None = None,
) -> _M:
    """A `cls` holding `values` as its fields, nothing validated or copied: what pydantic's
    `model_construct` ends with, without its per-field loop. The core's trusted builders (and
    the copies below) all come down to this."""
    new = cls.__new__(cls)
    _set(new, "__dict__", values)
    _set(new, "__pydantic_fields_set__", fields_set)
    _set(new, "__pydantic_extra__", None)
    _set(new, "__pydantic_private__", private)
    return new


class Immutable(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def assemble(cls, fields: dict[str, Any]) -> Self:
        """An instance of values already in the model's types, without validating them.

        For the core's hot outputs only, whose every value it computed itself; each use has a
        test that validates the same fields and compares. Like `model_construct`, at a third of
        its cost, but a missing or unknown field is an error, not a silent default or extra.
        """
        defaults = _defaults.get(cls)
        if defaults is None:
            defaults = _defaults[cls] = {
                name: f.default
                for name, f in cls.__pydantic_fields__.items()
                if f.default is not PydanticUndefined and f.default_factory is None
            }
        names = cls.__pydantic_fields__
        try:  # in the fields' order, which is the order they serialise in
            values = {n: fields[n] if n in fields else defaults[n] for n in names}
        except KeyError:
            values = {}
        if len(values) != len(names) or not fields.keys() <= names.keys():
            missing = names.keys() - fields.keys() - defaults.keys()
            unknown = fields.keys() - names.keys()
            raise TypeError(f"{cls.__name__}: missing {sorted(missing)}, unknown {sorted(unknown)}")
        return instance(cls, values, set(fields))

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy with `update` applied, not validated (as pydantic's); deep copies are its."""
        if deep or self.__pydantic_private__ is not None:
            return super().model_copy(update=update, deep=deep)
        cls = type(self)
        if not update:
            return instance(cls, dict(self.__dict__), set(self.__pydantic_fields_set__))
        unknown = update.keys() - cls.__pydantic_fields__.keys()
        if unknown:
            raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
        return instance(
            cls, {**self.__dict__, **update}, self.__pydantic_fields_set__ | update.keys()
        )


_defaults: dict[type[Immutable], dict[str, Any]] = {}
"""Per model, the fields with a plain default and their values (see `Immutable.assemble`)."""
