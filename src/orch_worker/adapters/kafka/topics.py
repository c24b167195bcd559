"""Every topic name comes from here, so the configurable prefix is applied in one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str = "orch."

    @property
    def signals(self) -> str:
        return f"{self.prefix}signals"

    @property
    def account_state(self) -> str:
        return f"{self.prefix}account-state"

    @property
    def execution_reports(self) -> str:
        return f"{self.prefix}execution-reports"

    @property
    def control(self) -> str:
        return f"{self.prefix}control"

    @property
    def prices(self) -> str:
        """Optional: latest price per symbol (key symbol), for the release drift budget."""
        return f"{self.prefix}prices"

    @property
    def order_intents(self) -> str:
        return f"{self.prefix}order-intents"

    @property
    def execution_results(self) -> str:
        return f"{self.prefix}execution-results"

    @property
    def interventions(self) -> str:
        return f"{self.prefix}interventions"

    @property
    def audit(self) -> str:
        return f"{self.prefix}audit"

    @property
    def dead_letter(self) -> str:
        return f"{self.prefix}dead-letter"

    @property
    def changelog(self) -> str:
        """The worker's own state changelog and outbox (internal; compacted on real Kafka)."""
        return f"{self.prefix}internal.worker-changelog"

    @property
    def portfolio_inputs(self) -> str:
        """Execution reports and control commands re-keyed by portfolio (internal)."""
        return f"{self.prefix}internal.portfolio-inputs"

    def public(self) -> tuple[str, ...]:
        return (
            self.signals,
            self.account_state,
            self.execution_reports,
            self.control,
            self.prices,
            self.order_intents,
            self.execution_results,
            self.interventions,
            self.audit,
            self.dead_letter,
        )

    def all(self) -> tuple[str, ...]:
        return (*self.public(), self.changelog, self.portfolio_inputs)

    def compacted(self) -> frozenset[str]:
        """Topics created with `cleanup.policy=compact`.

        Not the changelog: its decisions are an ordered log per portfolio (and its done markers
        have no key), so compaction would drop history that recovery folds.
        """
        return frozenset({self.account_state, self.prices})

    def retained_forever(self) -> frozenset[str]:
        """Topics created with `retention.ms=-1`: the worker's state must outlive any retention."""
        return frozenset({self.changelog})

    def by_short_name(self, name: str) -> str:
        """`signals` or `orch.signals` -> the prefixed topic; anything else is an error."""
        short = name.removeprefix(self.prefix)
        for topic in self.all():
            if topic == f"{self.prefix}{short}":
                return topic
        known = ", ".join(t.removeprefix(self.prefix) for t in self.public())
        raise ValueError(f"unknown topic {name!r}; known topics: {known}")
