"""The audit hash chain: linked, sequenced, continuable, and any tampering is found."""

from __future__ import annotations

from datetime import timedelta
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orch_worker.adapters.kafka.codec import encode
from orch_worker.domain import ids
from orch_worker.domain.audit import (
    GENESIS_HASH,
    AuditDraft,
    ChainHead,
    chain,
    chain_json,
    event_hash,
    verify_chain,
)
from orch_worker.domain.canonical import canonical_json, sha256_hex
from orch_worker.domain.models import AuditEvent
from tests import factories as f
from tests.unit.test_recovery_state import busy_portfolio


def drafts(n: int, start: int = 0) -> list[AuditDraft]:
    return [
        AuditDraft(
            type="test_event",
            rationale=f"event number {i}",
            data={"i": i, "quantity": f"{i}.50"},
            signal_id="sig-1",
            account_id=f"ACC-{i % 3 + 1}",
        )
        for i in range(start, start + n)
    ]


def events(n: int) -> tuple[AuditEvent, ...]:
    _, evs = chain("demo", ChainHead(), drafts(n), f.NOW)
    return evs


def test_first_event_links_to_the_genesis_hash_with_seq_one() -> None:
    first = events(1)[0]

    assert first.seq == 1
    assert first.prev_hash == GENESIS_HASH


def test_each_event_links_to_the_previous_hash_and_seq_increments_by_one() -> None:
    evs = events(5)

    assert [e.seq for e in evs] == [1, 2, 3, 4, 5]
    for before, after in pairwise(evs):
        assert after.prev_hash == before.hash
    assert len({e.hash for e in evs}) == 5


def test_hash_is_sha256_of_the_canonical_event_without_its_hash() -> None:
    e = events(1)[0]
    body = e.model_dump(mode="json")
    del body["hash"]

    assert e.hash == sha256_hex(canonical_json(body)) == event_hash(e)


def test_canonical_json_sorts_keys_without_whitespace() -> None:
    assert (
        canonical_json({"b": 1, "a": {"d": "x", "c": [1, 2]}}) == b'{"a":{"c":[1,2],"d":"x"},"b":1}'
    )


def test_returned_head_is_the_last_event() -> None:
    head, evs = chain("demo", ChainHead(), drafts(3), f.NOW)

    assert head == ChainHead(seq=3, hash=evs[-1].hash)


def test_chaining_nothing_returns_the_head_unchanged() -> None:
    head = ChainHead(seq=7, hash="a" * 64)

    assert chain("demo", head, [], f.NOW) == (head, ())


def test_chain_continues_from_a_head_as_if_chained_in_one_go() -> None:
    _, whole = chain("demo", ChainHead(), drafts(5), f.NOW)
    head, first = chain("demo", ChainHead(), drafts(2), f.NOW)
    _, rest = chain("demo", head, drafts(3, start=2), f.NOW)

    assert rest[0].seq == 3
    assert rest[0].prev_hash == first[-1].hash
    assert (*first, *rest) == whole
    assert verify_chain((*first, *rest)) is None


def test_event_fields_come_from_the_draft() -> None:
    d = AuditDraft(
        type="intent_released",
        rationale="released 0.34 EURUSD to ACC-1",
        data={"quantity": "0.34"},
        signal_id="sig-1",
        intent_id="int-1",
        account_id="ACC-1",
    )
    [e] = chain("demo", ChainHead(), [d], f.NOW)[1]

    assert (e.type, e.rationale, e.data) == (d.type, d.rationale, d.data)
    assert (e.signal_id, e.intent_id, e.account_id) == ("sig-1", "int-1", "ACC-1")
    assert (e.portfolio, e.ts) == ("demo", f.NOW)


def test_intact_chain_verifies() -> None:
    assert verify_chain(events(6)) is None
    assert verify_chain([]) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rationale", "nothing to see here"),
        ("data", {"i": 2, "quantity": "200.50"}),
        ("account_id", "ACC-9"),
        ("type", "other_event"),
        ("ts", f.NOW + timedelta(microseconds=1)),
        ("signal_id", None),
    ],
)
def test_verify_detects_an_altered_field(field: str, value: object) -> None:
    evs = list(events(4))
    evs[2] = evs[2].model_copy(update={field: value})

    problem = verify_chain(evs)

    assert problem is not None
    assert "seq 3" in problem
    assert "altered" in problem


def test_verify_detects_an_altered_event_whose_hash_was_recomputed() -> None:
    evs = list(events(4))
    forged = evs[1].model_copy(update={"rationale": "forged"})
    evs[1] = forged.model_copy(update={"hash": event_hash(forged)})

    problem = verify_chain(evs)

    assert problem is not None
    assert problem.startswith("seq 3")
    assert "prev_hash" in problem


@pytest.mark.parametrize("removed", [0, 1, 3])
def test_verify_detects_a_removed_event(removed: int) -> None:
    evs = list(events(5))
    del evs[removed]

    problem = verify_chain(evs)

    assert problem is not None
    assert "missing" in problem


def test_verify_detects_a_reordered_pair() -> None:
    evs = list(events(5))
    evs[1], evs[2] = evs[2], evs[1]

    problem = verify_chain(evs)

    assert problem is not None
    assert problem.startswith("seq 3: expected seq 2")


def test_verify_detects_a_duplicated_event() -> None:
    evs = list(events(3))

    assert verify_chain([evs[0], evs[1], evs[1], evs[2]]) is not None


def test_verify_detects_a_renumbered_event() -> None:
    evs = list(events(3))
    evs[2] = evs[2].model_copy(update={"seq": 4})

    assert verify_chain(evs) is not None


def test_event_ids_are_deterministic_per_portfolio_and_seq() -> None:
    a = events(3)
    _, b = chain("demo", ChainHead(), drafts(3, start=10), f.NOW + timedelta(hours=1))
    _, other = chain("other", ChainHead(), drafts(3), f.NOW)

    assert [e.event_id for e in a] == [e.event_id for e in b]
    assert [e.event_id for e in a] == [ids.audit_event_id("demo", s) for s in (1, 2, 3)]
    assert {e.event_id for e in a}.isdisjoint(e.event_id for e in other)
    assert [e.hash for e in a] != [e.hash for e in b]


def test_same_drafts_at_the_same_time_give_the_same_chain() -> None:
    assert events(4) == events(4)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(min_value=2, max_value=12))
def test_any_removal_but_the_last_or_any_adjacent_swap_breaks_the_chain(
    data: st.DataObject, n: int
) -> None:
    evs = list(events(n))
    assert verify_chain(evs) is None

    removed = data.draw(st.integers(min_value=0, max_value=n - 2), label="removed")
    assert verify_chain(evs[:removed] + evs[removed + 1 :]) is not None

    i = data.draw(st.integers(min_value=0, max_value=n - 2), label="swapped")
    swapped = list(evs)
    swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
    assert verify_chain(swapped) is not None


@settings(max_examples=40, deadline=None)
@given(split=st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=5))
def test_chaining_in_batches_equals_chaining_at_once(split: list[int]) -> None:
    everything = drafts(sum(split))
    head, start = ChainHead(), 0
    got: list[AuditEvent] = []
    for size in split:
        head, evs = chain("demo", head, everything[start : start + size], f.NOW)
        got.extend(evs)
        start += size

    assert tuple(got) == chain("demo", ChainHead(), everything, f.NOW)[1]
    assert head.seq == len(everything)


def test_the_json_written_with_the_chain_is_the_event_as_published_and_verifies() -> None:
    """Each event's JSON comes from the very dump that was hashed: it must be what encoding
    the event gives, and its hash must check out against the event."""
    run = busy_portfolio()
    run.at(40).due("sig-1")
    checked = 0
    for d in run.decisions:
        assert len(d.audit_json) == len(d.audit)
        for event, raw in zip(d.audit, d.audit_json, strict=True):
            assert raw == encode(event)
            assert AuditEvent.model_validate_json(raw) == event
            assert event_hash(event) == event.hash
            checked += 1
    assert checked > 10
    head, events, written = chain_json("demo", ChainHead(), drafts(3), f.NOW)
    assert (head, events) == chain("demo", ChainHead(), drafts(3), f.NOW)
    assert [encode(e) for e in events] == list(written)
