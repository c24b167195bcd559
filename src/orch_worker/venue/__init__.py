"""The paper venue: a seeded simulated broker that answers order intents with execution reports.

Its fill model is pure (`fill_model`), so the same seed and intent always give the same reports;
the Kafka shell that feeds it lives in `orch_worker.adapters.kafka.venue_app`.
"""
