"""Ids are the standard name-based UUIDs (version 5) of their parts, now and across versions.

Ids recorded in changelogs, topics and audit stores must come out the same for the same inputs
in every later version, so they are checked against the standard library's `uuid5` and against
ids fixed here once.
"""

from __future__ import annotations

import random
import uuid

from orch_worker.domain import ids


def test_ids_are_uuid5_of_their_parts() -> None:
    rng = random.Random(3)
    alphabet = "abcXYZ019-._:@/+ é€\x1f"
    for _ in range(2_000):
        parts = ["".join(rng.choices(alphabet, k=rng.randint(0, 30))) for _ in range(3)]
        expected = str(uuid.uuid5(ids.NAMESPACE, "\x1f".join([*parts, "7"])))
        assert ids._uuid(*parts, 7) == expected


def test_known_ids_do_not_change() -> None:
    assert ids.intent_id("sig-1", "ACC-1", 1) == "01824e3b-c68e-5760-b75e-41c5f1d35c1a"
    assert ids.audit_event_id("demo", 12) == "4c260894-3ca6-5903-8f7b-d4deb5d2f655"
