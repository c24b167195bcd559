"""Getting every input of a portfolio to the one worker that decides for it.

Signals are keyed by portfolio; execution reports and control commands are keyed by account
(or signal). A router, run by every worker in its own consumer group, re-keys reports and
control by portfolio onto an internal topic with the same partition count as `signals`. The
deciders read `signals` and that topic with the range assignor, so partition i of both (and of
the changelog, also keyed by portfolio) belongs to one worker: a single writer per portfolio,
and failover moves a portfolio's inputs and state together.
"""

from __future__ import annotations

from aiokafka.partitioner import murmur2

from orch_worker.domain.config import OrchConfig
from orch_worker.domain.models import ControlCommand, ExecutionReport

SOURCE_HEADER = "orch-source"
"""`topic/partition/offset` of the record a routed one was made from (for dead letters)."""
BROADCAST_HEADER = "orch-broadcast"
"""Set on copies sent to every partition: a decider that does not know the target ignores it."""


def portfolio_partition(portfolio: str, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner gives a portfolio key.

    Producers that use another partitioner (librdkafka's CRC32 default) may put a signal
    elsewhere; the decider forwards such a signal to the partition computed here.
    """
    return (int(murmur2(portfolio.encode("utf-8"))) & 0x7FFFFFFF) % partitions


def report_portfolio(report: ExecutionReport, cfg: OrchConfig) -> str | None:
    account = cfg.accounts.get(report.account_id)
    return account.portfolio if account is not None else None


def control_portfolio(cmd: ControlCommand, cfg: OrchConfig) -> str | None:
    """The portfolio a command is for, or None when only the deciders can tell (a signal id)."""
    if cmd.portfolio is not None:
        return cmd.portfolio
    if cmd.account_id is not None and cmd.account_id in cfg.accounts:
        return cfg.accounts[cmd.account_id].portfolio
    return None


def source(topic: str, partition: int, offset: int) -> str:
    return f"{topic}/{partition}/{offset}"


def parse_source(value: str) -> tuple[str, int, int]:
    topic, partition, offset = value.rsplit("/", 2)
    return topic, int(partition), int(offset)
