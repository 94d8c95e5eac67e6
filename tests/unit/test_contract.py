"""The field table is the one source: the published schema, the validator and the SDK builder follow it."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from pipeline.contract import FIELDS, Kind, ValidationPolicy, ValidEvent, generate_schema, validate_event
from pipeline.contract.fields import DATA_PLANE_NAMES, INVALID_REASONS, REQUIRED_NAMES, TYPED_NAMES
from pipeline.contract.schema import render_schema, schema_text
from pipeline.sdk.event_builder import GatewayRequestEvent
from pipeline.sdk.redaction import DATA_PLANE_FIELDS, RedactionConfig

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
POLICY = ValidationPolicy(max_age=timedelta(days=90), max_future_skew=timedelta(hours=1))
ORG = "0191b5e8-0000-7000-8000-000000000001"
EVENT_ID = "0191b5e8-0000-7000-8000-000000000002"


def test_the_published_schema_is_what_the_table_generates() -> None:
    # After a change to pipeline/contract/fields.py: `python -m pipeline.contract --write`.
    assert schema_text() == render_schema(generate_schema())


def test_the_schema_lists_every_field_in_table_order() -> None:
    schema = generate_schema()
    assert list(schema["properties"]) == [f.name for f in FIELDS]
    assert (
        schema["required"]
        == list(REQUIRED_NAMES)
        == ["event_id", "organization_id", "started_at", "duration_ms"]
    )


def test_valid_event_carries_the_typed_fields_of_the_table() -> None:
    names = [f.name for f in dataclasses.fields(ValidEvent)]
    assert names == ["line", *(n for n in TYPED_NAMES if n != "schema_version")]


def test_valid_event_is_built_by_keyword_only() -> None:
    with pytest.raises(TypeError):
        ValidEvent(b"{}", EVENT_ID)  # type: ignore[misc]


def _full_event() -> dict[str, Any]:
    """Every typed field set to a valid value other than its default."""
    values: dict[str, Any] = {}
    for number, spec in enumerate(FIELDS, start=1):
        match spec.kind:
            case Kind.VERSION:
                values[spec.name] = 1
            case Kind.UUID:
                values[spec.name] = f"0191b5e8-0000-7000-8000-{number:012x}"
            case Kind.TIMESTAMP:
                values[spec.name] = "2026-11-23T11:59:00.123Z"
            case Kind.INTEGER:
                assert spec.maximum is not None
                values[spec.name] = spec.maximum - number
            case Kind.TEXT:
                values[spec.name] = f"{spec.name}-{number}"
            case Kind.CHOICE:
                values[spec.name] = spec.choices[-1]
            case Kind.BOOLEAN:
                values[spec.name] = True
            case Kind.IP:
                values[spec.name] = "2001:db8::1"
            case Kind.ANY:
                values[spec.name] = {"n": number}
    return values


def test_every_field_of_a_validated_event_is_set_from_its_json_field() -> None:
    """The validator assigns fields by name: none may be left unset or swapped with another."""
    source = _full_event()
    result = validate_event(orjson.dumps(source), NOW, POLICY)
    assert isinstance(result, ValidEvent)
    as_dict = dataclasses.asdict(result)  # raises AttributeError on an unset slot
    for name, value in as_dict.items():
        if name == "line":
            assert value == orjson.dumps(source)
        elif name == "started_at":
            assert value == datetime(2026, 11, 23, 11, 59, 0, 123000, tzinfo=UTC)
        else:
            assert value == source[name], name


def _broken(spec_kind: Kind) -> object:
    # A value of the wrong JSON type for every kind (ANY fields take anything and are skipped).
    return [] if spec_kind is not Kind.BOOLEAN else "yes"


def test_rejection_follows_the_table_order() -> None:
    """With every typed field broken, each fix reveals the next field of the table, in order."""
    event = {spec.name: _broken(spec.kind) for spec in FIELDS if spec.kind is not Kind.ANY}
    valid = _full_event()
    for spec in FIELDS:
        if spec.kind is Kind.ANY:
            continue
        result = validate_event(orjson.dumps(event), NOW, POLICY)
        assert not isinstance(result, ValidEvent)
        assert result.detail.startswith(f"{spec.name}:"), (spec.name, result)
        event[spec.name] = valid[spec.name]
    assert isinstance(validate_event(orjson.dumps(event), NOW, POLICY), ValidEvent)


@pytest.mark.parametrize("spec", [f for f in FIELDS if f.kind is Kind.INTEGER], ids=lambda f: f.name)
def test_builder_and_validator_share_the_integer_bounds(spec: Any) -> None:
    base: dict[str, Any] = {"organization_id": ORG, "started_at": NOW, "duration_ms": 1}
    for edge in (spec.minimum, spec.maximum):
        built = GatewayRequestEvent(**{**base, spec.name: edge})
        assert isinstance(validate_event(orjson.dumps(built.to_dict()), NOW, POLICY), ValidEvent)
    for outside in (spec.minimum - 1, spec.maximum + 1):
        with pytest.raises(ValueError, match=spec.name):
            GatewayRequestEvent(**{**base, spec.name: outside})
        as_json = {**GatewayRequestEvent(**base).to_dict(), spec.name: outside}
        assert not isinstance(validate_event(orjson.dumps(as_json), NOW, POLICY), ValidEvent)


@pytest.mark.parametrize(
    "spec", [f for f in FIELDS if f.kind in {Kind.TEXT, Kind.CHOICE}], ids=lambda f: f.name
)
def test_builder_and_validator_share_text_limits_and_choices(spec: Any) -> None:
    base: dict[str, Any] = {"organization_id": ORG, "started_at": NOW, "duration_ms": 1}
    good = "x" * spec.max_length if spec.kind is Kind.TEXT else spec.choices[0]
    bad = good + "x" if spec.kind is Kind.TEXT else "not-a-choice"
    built = GatewayRequestEvent(**{**base, spec.name: good})
    assert isinstance(validate_event(orjson.dumps(built.to_dict()), NOW, POLICY), ValidEvent)
    with pytest.raises(ValueError, match=spec.name):
        GatewayRequestEvent(**{**base, spec.name: bad})
    as_json = {**GatewayRequestEvent(**base).to_dict(), spec.name: bad}
    assert not isinstance(validate_event(orjson.dumps(as_json), NOW, POLICY), ValidEvent)


def test_builder_attributes_are_the_table_fields() -> None:
    names = {f.name for f in dataclasses.fields(GatewayRequestEvent)} - {"extra"}
    assert names == {f.name for f in FIELDS} - {"schema_version"}


def test_a_fully_built_event_is_valid() -> None:
    source = {k: v for k, v in _full_event().items() if k != "schema_version"}
    source["started_at"] = NOW - timedelta(minutes=1)
    result = validate_event(orjson.dumps(GatewayRequestEvent(**source).to_dict()), NOW, POLICY)
    assert isinstance(result, ValidEvent)


def test_redaction_refuses_typed_fields_and_scans_the_data_plane_by_default() -> None:
    assert DATA_PLANE_FIELDS == DATA_PLANE_NAMES == ("request", "response", "headers", "metadata")
    for name in TYPED_NAMES:
        with pytest.raises(ValueError, match="typed"):
            RedactionConfig(field_paths=(name,))


def test_reasons_are_unique() -> None:
    assert len(set(INVALID_REASONS)) == len(INVALID_REASONS)
