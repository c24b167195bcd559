"""orch-worker: a transparent multi-account trade execution orchestrator on Kafka."""

__version__ = "0.1.0"
