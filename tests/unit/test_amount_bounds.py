"""Amounts are bounded: a unit mistake or hostile number is refused at the edge, not carried
into arithmetic and encoders that cannot hold it (found by the input fuzzer)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tests import factories as f


@pytest.mark.parametrize("huge", ["1e15", "99999999999999999999999999999", "-1e16"])
def test_quantities_and_prices_beyond_the_bound_are_refused(huge: str) -> None:
    with pytest.raises(ValidationError, match="smaller than 1e\\+15"):
        f.account("ACC-1", equity=huge)


def test_large_but_plausible_amounts_are_accepted() -> None:
    assert str(f.account("ACC-1", equity="250000000000").equity) == "250000000000"
