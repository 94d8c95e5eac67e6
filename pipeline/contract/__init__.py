"""The gateway request event contract (docs/contract.md §1): field table, validation, JSON Schema.

Imports only the base dependencies (orjson), so a producer can validate without the worker's.
"""

from pipeline.contract.fields import FIELDS, FIELDS_BY_NAME, Field, InvalidReason, Kind
from pipeline.contract.schema import generate_schema, load_schema, schema_text
from pipeline.contract.validate import InvalidEvent, ValidationPolicy, ValidEvent, validate_event

__all__ = [
    "FIELDS",
    "FIELDS_BY_NAME",
    "Field",
    "InvalidEvent",
    "InvalidReason",
    "Kind",
    "ValidEvent",
    "ValidationPolicy",
    "generate_schema",
    "load_schema",
    "schema_text",
    "validate_event",
]
