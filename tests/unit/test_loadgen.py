"""The load generator: determinism, its summary (recomputed here independently), invalid kinds."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import orjson
import pytest

from pipeline.contract import InvalidEvent, ValidationPolicy, ValidEvent, validate_event
from pipeline.devtools.loadgen.generator import INVALID_KINDS, LoadConfig, generate
from pipeline.devtools.loadgen.summary import summarize

BASE = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
POLICY = ValidationPolicy(max_age=timedelta(days=90), max_future_skew=timedelta(hours=1))


def config(**overrides: Any) -> LoadConfig:
    options: dict[str, Any] = {"count": 6000, "seed": 7, "base_time": BASE, "orgs": 4, "servers_per_org": 3}
    options.update(overrides)
    return LoadConfig(**options)


def wire(cfg: LoadConfig) -> list[tuple[bytes, bytes]]:
    return [(m.key, m.value) for m in generate(cfg)]


def test_same_seed_same_bytes_and_shorter_run_is_a_prefix() -> None:
    cfg = config(late_fraction=0.1, duplicate_fraction=0.05, invalid_fraction=0.05)
    first = wire(cfg)
    assert first == wire(cfg)
    assert (
        wire(config(late_fraction=0.1, duplicate_fraction=0.05, invalid_fraction=0.05, count=2500))
        == first[:2500]
    )
    other = wire(config(late_fraction=0.1, duplicate_fraction=0.05, invalid_fraction=0.05, seed=8))
    assert len(other) == len(first)
    assert sum(a == b for a, b in zip(first, other, strict=True)) == 0


def test_valid_events_pass_the_validator_and_follow_the_config() -> None:
    cfg = config(count=4000, late_fraction=0.2, span_hours=6)
    span_start = BASE - timedelta(hours=6)
    late = 0
    keys_seen = set()
    for message in generate(cfg):
        assert message.kind == "valid"
        result = validate_event(message.value, BASE, POLICY)
        assert isinstance(result, ValidEvent), result
        assert result.event_id == message.event_id
        assert message.key == f"{result.organization_id}:{result.server_id}".encode()
        keys_seen.add(message.key)
        assert result.started_at <= BASE
        if result.started_at <= span_start - timedelta(hours=1):
            late += 1
            assert result.started_at >= span_start - timedelta(hours=cfg.late_max_hours)
        else:
            assert result.started_at > span_start
    assert 0.15 < late / 4000 < 0.25
    assert len(keys_seen) <= cfg.orgs * cfg.servers_per_org


def test_traffic_shape_is_skewed_and_realistic() -> None:
    messages = list(generate(config(count=20_000, orgs=10)))
    events = [orjson.loads(m.value) for m in messages]
    orgs = Counter(e["organization_id"] for e in events).most_common()
    assert orgs[0][1] > 3 * orgs[-1][1]  # Zipf: the largest tenant dwarfs the smallest
    methods = Counter(e["rpc_method"] for e in events)
    assert methods.most_common(1)[0][0] == "tools/call"
    assert {"resources/read", "prompts/get", "initialize", "tools/list"} <= set(methods)
    errors = sum(e["status_code"] >= 400 for e in events) / len(events)
    assert 0.005 < errors < 0.1
    mean_size = np.mean([len(m.value) for m in messages])
    assert 600 < mean_size < 1000
    model_calls = [e for e in events if e["rpc_method"] == "sampling/createMessage"]
    assert model_calls
    assert all(
        {"project_id", "model", "input_tokens", "cost_cents", "event_type", "status"} <= set(e)
        for e in model_calls
    )
    tools = [e for e in events if e["rpc_method"] == "tools/call"]
    assert all(e["event_type"] == "mcp_tool" and e["mcp_tool_name"] for e in tools)
    # Per-method latency medians differ by orders of magnitude (log-normal per method).
    median = {
        m: np.median([e["duration_ms"] for e in events if e["rpc_method"] == m])
        for m in ("ping", "sampling/createMessage")
    }
    assert median["sampling/createMessage"] > 100 * median["ping"]


def test_invalid_messages_are_the_advertised_kinds() -> None:
    kinds = Counter()
    for message in generate(config(count=3000, invalid_fraction=1.0)):
        assert message.kind == "invalid"
        result = validate_event(message.value, BASE, POLICY)
        assert isinstance(result, InvalidEvent), message.value[:200]
        assert result.reason == message.invalid_kind, (result, message.value[:300])
        kinds[result.reason] += 1
    assert set(kinds) == set(INVALID_KINDS)


def test_duplicates_resend_an_earlier_valid_message_byte_for_byte() -> None:
    seen: dict[str, bytes] = {}
    duplicates = 0
    for message in generate(config(count=5000, duplicate_fraction=0.2)):
        if message.kind == "duplicate":
            duplicates += 1
            assert seen[message.event_id or ""] == message.value
        else:
            seen[message.event_id or ""] = message.value
    assert 800 < duplicates < 1200


def _expected_from_wire(values: list[bytes]) -> dict[str, Any]:
    """The oracle, recomputed from the bytes alone, with plain Python grouping."""
    seen: set[str] = set()
    counts = Counter()
    by_kind = Counter()
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    usage: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for value in values:
        result = validate_event(value, BASE, POLICY)
        if isinstance(result, InvalidEvent):
            counts["invalid"] += 1
            by_kind[result.reason] += 1
            continue
        if result.event_id in seen:
            counts["duplicate"] += 1
            continue
        seen.add(result.event_id)
        counts["valid"] += 1
        event = orjson.loads(value)
        hour = result.started_at.replace(minute=0, second=0, microsecond=0)
        day = hour.replace(hour=0)
        for window_type, start in (("hourly", hour), ("daily", day)):
            stamp = start.strftime("%Y-%m-%dT%H:%M:%SZ")
            for server, method in (
                (result.server_id, result.rpc_method),
                (result.server_id, None),
                (None, None),
            ):
                groups[(window_type, stamp, result.organization_id, server, method)].append(event)
            if result.project_id is not None:
                usage[(window_type, stamp, result.organization_id, result.project_id, result.model)].append(
                    event
                )
    return {"counts": counts, "by_kind": by_kind, "groups": groups, "usage": usage}


def test_summary_matches_an_independent_recomputation() -> None:
    cfg = config(count=8000, late_fraction=0.05, duplicate_fraction=0.05, invalid_fraction=0.03, span_hours=5)
    messages = list(generate(cfg))
    summary = summarize(messages, cfg)
    expected = _expected_from_wire([m.value for m in messages])

    assert summary["messages"]["total"] == len(messages)
    assert summary["messages"]["valid"] == expected["counts"]["valid"]
    assert summary["messages"]["duplicate"] == expected["counts"]["duplicate"]
    assert summary["messages"]["invalid"] == expected["counts"]["invalid"]
    assert summary["messages"]["invalid_by_kind"] == dict(expected["by_kind"])
    assert summary["valid"]["late"] > 0

    rows = {
        (r["window_type"], r["window_start"], r["organization_id"], r["server_id"], r["rpc_method"]): r
        for r in summary["log_aggregates"]
    }
    assert set(rows) == set(expected["groups"])
    for key, events in expected["groups"].items():
        row = rows[key]
        durations = np.array([e["duration_ms"] for e in events])
        errors = sum(e["status_code"] >= 400 for e in events)
        assert row["total_requests"] == len(events)
        assert row["error_requests"] == errors
        assert row["success_requests"] == len(events) - errors
        assert row["total_bytes_in"] == sum(e["bytes_in"] for e in events)
        assert row["total_bytes_out"] == sum(e["bytes_out"] for e in events)
        assert row["sum_duration_ms"] == int(durations.sum())
        for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
            assert row[f"{name}_duration_ms"] == int(np.quantile(durations, q, method="lower")), (key, name)

    usage_rows = {
        (r["window_type"], r["window_start"], r["organization_id"], r["project_id"], r["model"]): r
        for r in summary["usage"]
    }
    assert set(usage_rows) == set(expected["usage"])
    for key, events in expected["usage"].items():
        row = usage_rows[key]
        assert row["request_count"] == len(events)
        for status in ("success", "error", "timeout", "rate_limited"):
            assert row[f"{status}_count"] == sum(e["status"] == status for e in events)
        for field in (
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
            "cost_cents",
        ):
            assert row[f"total_{field}"] == sum(e.get(field, 0) for e in events)


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="base_time"):
        LoadConfig(base_time=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="duplicate_fraction"):
        LoadConfig(base_time=BASE, duplicate_fraction=0.7, invalid_fraction=0.5)
