"""The worker's partitioner puts every key where Kafka's default partitioner would.

Consumers and the changelog rely on a portfolio's records landing in one partition, the one
any Kafka client computes for the key; remembering hashes must never change the answer.
"""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner

from orch_worker.adapters.kafka.clients import KeyHashPartitioner


def test_keys_go_where_the_default_partitioner_sends_them() -> None:
    ours, theirs = KeyHashPartitioner(), DefaultPartitioner()
    rng = random.Random(7)
    keys = [b"", b"demo", b"sig-1", "pf-é".encode()] + [
        rng.randbytes(rng.randint(1, 40)) for _ in range(2_000)
    ]
    for n in (1, 3, 8, 12):
        partitions = list(range(n))
        for key in keys + keys:  # the second pass answers from the memo
            assert ours(key, partitions, partitions) == theirs(key, partitions, partitions)


def test_the_memo_is_bounded() -> None:
    ours = KeyHashPartitioner()
    partitions = list(range(4))
    for i in range(KeyHashPartitioner.LIMIT + 10):
        ours(str(i).encode(), partitions, partitions)
    assert len(ours._hashes) <= KeyHashPartitioner.LIMIT


def test_a_keyless_record_goes_to_an_available_partition() -> None:
    ours = KeyHashPartitioner()
    assert {ours(None, [0, 1, 2, 3], [2]) for _ in range(20)} == {2}
