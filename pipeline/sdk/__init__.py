"""The producer SDK: how a gateway service builds, redacts and emits gateway request events.

Needs only the base install (`pip install omnilog`); the worker's dependencies are not imported.
"""

from pipeline.sdk.event_builder import GatewayRequestEvent, format_timestamp, new_event_id
from pipeline.sdk.producer import DeliveryFailure, EventProducer, ProducerClosedError, ProducerStats
from pipeline.sdk.redaction import MARKER, RedactionConfig

__all__ = [
    "MARKER",
    "DeliveryFailure",
    "EventProducer",
    "GatewayRequestEvent",
    "ProducerClosedError",
    "ProducerStats",
    "RedactionConfig",
    "format_timestamp",
    "new_event_id",
]
