"""Builds a production ingest worker: the worker core plus the batch extensions and partition
maintenance that live in `sinks`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from consumers.ingest.worker import IngestWorker
from pipeline.settings import Settings


def build_worker(settings: Settings, registry: CollectorRegistry | None = None) -> IngestWorker:
    return IngestWorker(settings, registry=registry)
