"""docs/examples/asgi_gateway.py: the example gateway emits one event per request to the broker."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import httpx
import orjson
import pytest

from pipeline.contract import ValidationPolicy, ValidEvent, validate_event
from pipeline.devtools.stack import StackInfo
from pipeline.kafka_admin import ensure_topics
from pipeline.sdk.redaction import MARKER
from tests.integration.test_producer import read_all

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "asgi_gateway.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("asgi_gateway_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_example_gateway_emits_one_event_per_request(stack_info: StackInfo) -> None:
    bootstrap = stack_info.kafka_bootstrap_servers
    topic = f"test.asgi.{uuid.uuid4().hex[:10]}"
    await ensure_topics(bootstrap, {topic: 3})
    app = load_example().create_app(bootstrap, topic)
    org, server, session = (str(uuid.uuid4()) for _ in range(3))
    headers = {
        "x-organization-id": org,
        "mcp-session-id": session,
        "authorization": "Bearer very-secret-token",
        "x-user-id": "user-42",
    }
    calls = [
        ({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "search_docs"}}, 200),
        ({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, 200),
        (
            {
                "jsonrpc": "2.0",
                "id": 3,
                "method": "prompts/get",
                "params": {"note": "mail me: bob@example.com"},
            },
            404,
        ),
    ]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            for body, expected_status in calls:
                response = await client.post(f"/mcp/{server}", content=orjson.dumps(body), headers=headers)
                assert response.status_code == expected_status
            # No organization header: served, but not a tenant event.
            anonymous = await client.post(f"/mcp/{server}", content=orjson.dumps(calls[1][0]))
            assert anonymous.status_code == 200
        producer = app.state.producer
    # Leaving the lifespan closed the producer, which flushed.
    assert producer.stats.delivered == 3 and producer.stats.failed == 0

    messages = await read_all(bootstrap, topic, 3)
    assert len(messages) == 3
    events = sorted((orjson.loads(value) for _, value in messages), key=lambda e: e["request"]["id"])
    now = datetime.now(UTC)
    policy = ValidationPolicy(max_age=timedelta(days=1), max_future_skew=timedelta(minutes=5))
    for key, value in messages:
        assert key == f"{org}:{server}".encode()
        assert isinstance(validate_event(value, now, policy), ValidEvent)
    for event, (body, status) in zip(events, calls, strict=True):
        assert event["organization_id"] == org
        assert event["server_id"] == server
        assert event["session_id"] == session
        assert event["rpc_method"] == body["method"]
        assert event["status_code"] == status
        assert event["remote_ip"] == "203.0.113.9"
        assert event["user_id"] == "user-42"
        assert event["bytes_in"] == len(orjson.dumps(body))
        assert event["bytes_out"] > 0
        assert event["headers"]["authorization"] == MARKER
        assert event["redaction_version"] == 1
        assert event["response"]["id"] == body["id"]
        assert abs(datetime.fromisoformat(event["started_at"]) - now) < timedelta(minutes=1)
    assert events[0]["mcp_tool_name"] == "search_docs" and events[0]["event_type"] == "mcp_tool"
    assert events[2]["request"]["params"]["note"] == f"mail me: {MARKER}"
