"""The API's limits, against the real stack: rate per key, page size, time range, request
timeout, body size, and hostile parameters answered with a 400 problem, never a 5xx."""

from __future__ import annotations

import asyncio
import base64
import gzip
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import httpx
import orjson
import pytest

from pipeline.devtools.stack import StackInfo
from sinks.objects import ObjectWriter, s3_client
from tests.integration.api_world import World, api_client, app_for, build_world

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
async def world(stack_info: StackInfo) -> AsyncIterator[World]:
    async with build_world(stack_info, seed=7) as built:
        yield built


def _problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = response.json()
    assert body["status"] == status and isinstance(body["title"], str)
    return body


async def test_rate_limit_per_key_answers_429_with_retry_after(world: World) -> None:
    async with api_client(app_for(world, api_rate_per_s=0.01, api_rate_burst=2)) as client:
        for _ in range(2):
            assert (await client.get("/v1/usage", headers=world.a.headers)).status_code == 200
        limited = await client.get("/v1/usage", headers=world.a.headers)
        _problem(limited, 429)
        assert int(limited.headers["retry-after"]) >= 1
        # The other organization's key has its own bucket.
        assert (await client.get("/v1/usage", headers=world.b.headers)).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'omnilog_api_requests_total{method="GET",route="/v1/usage",status="429"} 1.0' in metrics
        assert 'omnilog_api_request_duration_seconds_count{method="GET",route="/v1/usage"} 4.0' in metrics


async def test_page_size_and_time_range_are_bounded(world: World) -> None:
    async with api_client(app_for(world, api_rate_burst=10_000)) as client:
        h = world.a.headers
        assert _problem(await client.get("/v1/logs", params={"limit": 1001}, headers=h), 400)["detail"]
        assert (await client.get("/v1/logs", params={"limit": 1000}, headers=h)).status_code == 200
        until = world.now
        for path in ("/v1/logs", "/v1/aggregates", "/v1/usage"):
            too_long = {
                "since": (until - timedelta(days=31, seconds=1)).isoformat(),
                "until": until.isoformat(),
            }
            assert _problem(await client.get(path, params=too_long, headers=h), 400)["type"] == (
                "urn:omnilog:problem:range-too-long"
            )
            reversed_range = {"since": until.isoformat(), "until": (until - timedelta(hours=1)).isoformat()}
            _problem(await client.get(path, params=reversed_range, headers=h), 400)


async def test_hostile_parameters_are_400_problems(world: World) -> None:
    deep = base64.urlsafe_b64encode(b"[" * 300 + b"]" * 300).decode()
    bad_id = base64.urlsafe_b64encode(orjson.dumps(["2026-01-01T00:00:00+00:00", "x'; drop"])).decode()
    naive = base64.urlsafe_b64encode(
        orjson.dumps(["2026-01-01T00:00:00", "0" * 8 + "-0000-0000-0000-" + "0" * 12])
    )
    huge_offset = base64.urlsafe_b64encode(
        orjson.dumps(["9999-12-31T23:59:59-23:59", "00000000-0000-0000-0000-000000000000"])
    ).decode()
    hostile = [
        {"method": "tools/\x00call"},
        {"user_id": "a\x00b"},
        {"user_id": "u" * 256},
        {"status": str(1 << 70)},
        {"limit": str(1 << 70)},
        {"limit": "-1"},
        {"since": "9999-12-31T23:59:59-23:59"},
        {"since": "not a time"},
        {"server_id": "1' OR '1'='1"},
        {"level": "panic"},
        {"cursor": "!!!"},
        {"cursor": deep},
        {"cursor": bad_id},
        {"cursor": naive.decode()},
        {"cursor": huge_offset},
        {"cursor": "A" * 513},
    ]
    async with api_client(app_for(world, api_rate_burst=10_000)) as client:
        for params in hostile:
            response = await client.get("/v1/logs", params=params, headers=world.a.headers)
            assert response.status_code == 400, params
            body = _problem(response, 400)
            assert "Traceback" not in response.text and "asyncpg" not in response.text, params
            assert len(str(body.get("detail", ""))) <= 300
        for path in ("/v1/events/not-a-uuid", "/v1/events/" + "0" * 5000):
            _problem(await client.get(path, headers=world.a.headers), 400)
        _problem(
            await client.get("/v1/aggregates", params={"window": "weekly"}, headers=world.a.headers), 400
        )
        assert (await client.get("/nowhere", headers=world.a.headers)).status_code == 404
        # Odd but valid text is a filter like any other: nothing matches, no error.
        odd = {"method": "\u00ed\u00a0\u0080 \U0001f600", "user_id": "\u202e" * 255}
        assert (await client.get("/v1/logs", params=odd, headers=world.a.headers)).json()["items"] == []


async def test_request_bodies_are_limited(world: World) -> None:
    async with api_client(app_for(world, api_max_body_bytes=1024)) as client:
        big = await client.request("GET", "/v1/usage", content=b"x" * 4096, headers=world.a.headers)
        _problem(big, 413)
        small = await client.request("GET", "/v1/usage", content=b"x" * 100, headers=world.a.headers)
        assert small.status_code == 200


async def test_a_request_stuck_on_a_lock_times_out_and_the_pool_recovers(world: World) -> None:
    owner = await asyncpg.connect(world.owner_url)
    try:
        async with api_client(app_for(world, api_request_timeout_s=0.5, api_pool_size=1)) as client:
            lock = owner.transaction()
            await lock.start()
            await owner.execute("LOCK TABLE log_index IN ACCESS EXCLUSIVE MODE")
            began = time.perf_counter()
            stuck = await client.get("/v1/logs", headers=world.a.headers)
            elapsed = time.perf_counter() - began
            await lock.rollback()
            _problem(stuck, 504)
            assert elapsed < 10, elapsed  # without the timeout it would wait for the lock forever
            await asyncio.sleep(0.1)
            after = await client.get("/v1/logs", params={"limit": 1000}, headers=world.a.headers)
            assert after.status_code == 200
            assert {i["id"] for i in after.json()["items"]} <= set(world.a.events)
    finally:
        await owner.close()


async def test_a_hostile_stored_event_comes_back_byte_for_byte(world: World) -> None:
    """2 MiB, 300 levels of nesting, a number past 64 bits, escapes and non-ASCII: the API
    returns the stored line as it is (never re-encoded: orjson writes at most 254 levels)."""
    event_id = str(uuid.uuid4())
    line = (
        b'{"event_id":"' + event_id.upper().encode() + b'","organization_id":"' + world.a.org.encode()
        + b'","started_at":"' + world.now.isoformat().encode() + b'","request":' + b"[" * 300 + b"]" * 300
        + b',"n":123456789012345678901234567890,"s":"\\u0000\\ud83d\\ude00 \xc3\xa9","blob":"'
        + b"x" * (2 << 20) + b'"}'
    )  # fmt: skip
    member = gzip.compress(line + b"\n")
    key = f"api-test/hostile-{uuid.uuid4().hex}.jsonl.gz"
    owner = await asyncpg.connect(world.owner_url)
    try:
        async with s3_client(world.settings) as s3:
            await ObjectWriter(s3, world.settings.s3_bucket, 1 << 30).put(key, member)
        await owner.execute(
            "INSERT INTO log_index (id, organization_id, started_at, storage_provider, object_uri, "
            "byte_offset, byte_length) VALUES ($1::uuid, $2::uuid, $3, 's3', $4, 0, $5)",
            event_id,
            world.a.org,
            world.now,
            f"s3://{world.settings.s3_bucket}/{key}",
            len(member),
        )
    finally:
        await owner.close()
    async with api_client(app_for(world, api_rate_burst=10_000)) as client:
        response = await client.get(f"/v1/events/{event_id}", headers=world.a.headers)
        assert response.status_code == 200
        assert response.content == line
        assert (await client.get(f"/v1/events/{event_id}", headers=world.b.headers)).status_code == 404
        page = await client.get("/v1/logs", params={"limit": 1000}, headers=world.a.headers)
        assert event_id in {i["id"] for i in page.json()["items"]}
