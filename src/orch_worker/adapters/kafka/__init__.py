"""Kafka edges: topic names, client settings, the worker, the venue and the audit sink apps."""
