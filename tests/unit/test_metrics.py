"""`Metrics.count` is `labels(...).inc()`: the remembered children are the registry's own."""

from __future__ import annotations

from orch_worker.adapters.metrics import Metrics


def test_count_increments_the_labelled_series_of_the_registry() -> None:
    m = Metrics.create("worker")
    for _ in range(3):
        m.count(m.published, "orch.audit")
    m.count(m.outcomes, "timer", "released")
    m.published.labels("orch.audit").inc()
    sample = m.registry.get_sample_value
    assert sample("orch_messages_published_total", {"topic": "orch.audit"}) == 4
    assert sample("orch_messages_published_total", {"topic": "orch.changelog"}) is None
    assert sample("orch_decisions_total", {"input": "timer", "outcome": "released"}) == 1
