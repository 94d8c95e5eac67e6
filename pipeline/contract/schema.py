"""The JSON Schema (draft 2020-12) of the event, generated from the field table.

The committed file `pipeline/schemas/gateway_request.v1.json` is the published artefact (shipped in
the package, printed by `omnilog schema`); `generate_schema()` is where it comes from. A unit test
fails when the two differ, and `python -m pipeline.contract --write` rewrites the file.
"""

from __future__ import annotations

import importlib.resources
import json
from typing import Any, Final

import orjson

from pipeline.contract.fields import FIELDS, REQUIRED_NAMES, TIMESTAMP_PATTERN, UUID_PATTERN, Field, Kind

__all__ = ["SCHEMA_RESOURCE", "generate_schema", "load_schema", "render_schema", "schema_text"]

SCHEMA_RESOURCE: Final = "schemas/gateway_request.v1.json"  # inside the `pipeline` package

# `$` in a JSON Schema (ECMA-262) pattern also matches before a final newline in Python's `re`,
# which jsonschema uses; "not followed by any character" is an end anchor both read the same way.
_END: Final = "(?![\\s\\S])"
_NO_NUL: Final = "^[^\\u0000]*$"
_DESCRIPTION: Final = (
    "One JSON object per Kafka message value (UTF-8). Formats (uuid, date-time, ipv4, ipv6) must be "
    "asserted by the validator (in Python: jsonschema.FormatChecker); uuid and date-time are also pinned "
    "by patterns. Not expressible here: started_at must lie within [now - max age, now + max future skew] "
    "of the ingest worker's clock (default 90 days and 1 hour). A number with an integral value (5.0) is "
    "an integer, as JSON Schema defines it. Unknown properties are allowed and kept."
)


def _typed(json_type: str, field: Field) -> str | list[str]:
    # A required field present with null is rejected (missing_field); an optional one may be null.
    return json_type if field.required else [json_type, "null"]


def _property(field: Field) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if field.description is not None:
        out["description"] = field.description
    match field.kind:
        case Kind.VERSION:
            out |= {"type": ["integer", "null"], "enum": [1, None]}
        case Kind.UUID:
            out |= {"type": _typed("string", field), "format": "uuid", "pattern": f"^{UUID_PATTERN}{_END}"}
        case Kind.TIMESTAMP:
            # Year 0000 does not exist in RFC 3339's calendar (nor in Python's).
            pattern = f"^(?!0000){TIMESTAMP_PATTERN}{_END}"
            out |= {"type": _typed("string", field), "format": "date-time", "pattern": pattern}
        case Kind.INTEGER:
            out |= {"type": _typed("integer", field), "minimum": field.minimum, "maximum": field.maximum}
        case Kind.TEXT:
            out["description"] = " ".join(
                part for part in (field.description, "No U+0000 (PostgreSQL text cannot hold it).") if part
            )
            out |= {"type": _typed("string", field), "maxLength": field.max_length, "pattern": _NO_NUL}
        case Kind.CHOICE:
            out |= {"type": _typed("string", field), "enum": [*field.choices, None]}
        case Kind.BOOLEAN:
            out["type"] = _typed("boolean", field)
        case Kind.IP:
            out["anyOf"] = [
                {"type": "null"},
                {"type": "string", "format": "ipv4"},
                {"type": "string", "format": "ipv6"},
            ]
        case Kind.ANY:
            pass
    return out


def generate_schema() -> dict[str, Any]:
    """The JSON Schema of the event, built from `fields.FIELDS`."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:omnilog:schema:gateway_request:v1",
        "title": "Omnilog gateway request event, schema version 1",
        "description": _DESCRIPTION,
        "type": "object",
        "required": list(REQUIRED_NAMES),
        "properties": {field.name: _property(field) for field in FIELDS},
        "additionalProperties": True,
    }


def render_schema(schema: dict[str, Any]) -> str:
    """The text of the published file: 2-space indent, non-ASCII kept, one final newline."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def schema_text() -> str:
    """The published JSON Schema of the event, as the file's text."""
    resource = importlib.resources.files("pipeline").joinpath(SCHEMA_RESOURCE)
    return resource.read_text(encoding="utf-8")


def load_schema() -> dict[str, Any]:
    """The published JSON Schema of the event, parsed."""
    schema = orjson.loads(schema_text())
    assert isinstance(schema, dict)
    return schema
