"""Deterministic synthetic gateway traffic (`generator`, shaped by `model`), its fast Kafka
sender (`kafka`) and the oracle summary of what was sent (`summary`)."""
